"""`AsyncClient` offers what `Client` offers: the same resources, the same public methods, the same
parameters (names, kinds, defaults, annotations). The differences below are the only intended ones;
anything else that drifts fails here."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from qdpo_client import AsyncClient, Client

# (resource, method) -> parameters only the sync method has. The sync `wait` draws a progress bar on
# stderr; an async caller has its own event loop and display, so it gets `on_event` / `on_update` only.
SYNC_ONLY_PARAMETERS = {("jobs", "wait"): {"progress"}}
# Sync name -> async name, where Python's conventions differ (`close` is awaited as `aclose`).
RENAMED = {("client", "close"): "aclose", ("client", "__enter__"): "__aenter__", ("client", "__exit__"): "__aexit__"}
CLIENT_DUNDERS = ("__enter__", "__exit__", "__aenter__", "__aexit__")


def _resources(client) -> dict[str, object]:
    return {name: value for name, value in vars(client).items() if not name.startswith("_") and hasattr(value, "_http")}


def _methods(obj, dunders: tuple[str, ...] = ()) -> dict[str, object]:
    names = [n for n in dir(type(obj)) if not n.startswith("_")] + [n for n in dunders if hasattr(type(obj), n)]
    return {name: getattr(type(obj), name) for name in names if callable(getattr(type(obj), name))}


def _parameters(function) -> dict[str, tuple]:
    return {
        name: (parameter.kind.name, parameter.default, str(parameter.annotation))
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self"
    }


def differences(sync_obj, async_obj, where: str, dunders: tuple[str, ...] = ()) -> list[str]:
    """Every way async_obj's public methods differ from sync_obj's, beyond the intended ones."""
    found = []
    sync_methods, async_methods = _methods(sync_obj, dunders), _methods(async_obj, dunders)
    expected_async = {RENAMED.get((where, name), name) for name in sync_methods}
    for name in sorted(expected_async - set(async_methods)):
        found.append(f"{where}.{name}: missing from the async client")
    for name in sorted(set(async_methods) - expected_async):
        found.append(f"{where}.{name}: only in the async client")
    for name, sync_function in sorted(sync_methods.items()):
        async_name = RENAMED.get((where, name), name)
        async_function = async_methods.get(async_name)
        if async_function is None:
            continue
        if not (inspect.iscoroutinefunction(async_function) or inspect.isasyncgenfunction(async_function)):
            found.append(f"{where}.{async_name}: not awaitable in the async client")
        sync_parameters, async_parameters = _parameters(sync_function), _parameters(async_function)
        for parameter in SYNC_ONLY_PARAMETERS.get((where, name), set()):
            sync_parameters.pop(parameter, None)
        if list(sync_parameters) != list(async_parameters):
            found.append(f"{where}.{name}: parameters {list(sync_parameters)} (sync) vs {list(async_parameters)} (async)")
            continue
        for parameter, described in sync_parameters.items():
            if async_parameters[parameter] != described:
                found.append(f"{where}.{name}({parameter}): {described} (sync) vs {async_parameters[parameter]} (async)")
    return found


@pytest.fixture
def clients():
    sync = Client("http://qdpo.test", api_key="k")
    asynchronous = AsyncClient("http://qdpo.test", api_key="k")
    yield sync, asynchronous
    sync.close()
    asyncio.run(asynchronous.aclose())


def test_the_async_client_has_every_resource_method_and_parameter_of_the_sync_one(clients):
    sync, asynchronous = clients
    sync_resources, async_resources = _resources(sync), _resources(asynchronous)
    assert set(sync_resources) == set(async_resources) == {"files", "jobs", "models", "webhooks"}
    found = differences(sync, asynchronous, "client", CLIENT_DUNDERS)
    for name in sorted(sync_resources):
        found += differences(sync_resources[name], async_resources[name], name)
    assert not found, "\n".join(found)
    # The constructors take the same arguments, too (only the http_client's type differs: httpx.Client / httpx.AsyncClient).
    constructor = {k: v[:2] for k, v in _parameters(Client.__init__).items()}
    assert constructor == {k: v[:2] for k, v in _parameters(AsyncClient.__init__).items()}
    assert "httpx.AsyncClient" in _parameters(AsyncClient.__init__)["http_client"][2]


def test_the_parity_check_catches_drift():
    # The checker itself must be able to fail: a missing method, a missing parameter, a changed default, a sync method.
    class Sync:
        _http = None

        def get(self, job_id: str, *, limit: int = 10): ...

        def content(self, file_id: str): ...

        def wait(self, job_id: str, *, progress: bool = True, timeout: float | None = None): ...

        def report(self, job_id: str, *, markdown: bool = False): ...

    class Async:
        _http = None

        async def get(self, job_id: str, *, limit: int = 20): ...

        async def wait(self, job_id: str, *, timeout: float | None = None): ...

        def report(self, job_id: str): ...

    assert differences(Sync(), Async(), "jobs") == [
        "jobs.content: missing from the async client",
        "jobs.get(limit): ('KEYWORD_ONLY', 10, 'int') (sync) vs ('KEYWORD_ONLY', 20, 'int') (async)",
        "jobs.report: not awaitable in the async client",
        "jobs.report: parameters ['job_id', 'markdown'] (sync) vs ['job_id'] (async)",
    ]  # `wait` without `progress` is the one intended difference
