"""HTTP plumbing shared by the sync and async clients: auth, retries, error mapping.

Retried (exponential backoff with jitter): connection failures, timeouts, 429 and 5xx answers —
a 503 `database_unavailable` among them. When the server says when to come back (`Retry-After`,
in seconds), the next try waits at least that long (at most RETRY_AFTER_MAX_S).
Job creation is retried safely because every create sends an Idempotency-Key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from qdpo_client.config import Connection, resolve_connection
from qdpo_client.errors import APIConnectionError, APIError, AuthenticationError, error_for


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, APIError) and (exc.status_code >= 500 or exc.status_code == 429)


RETRY_AFTER_MAX_S = 30.0


class wait_retry_after(wait_base):
    """The backoff's wait, or the server's Retry-After when that is longer (capped)."""

    def __init__(self, backoff: wait_base):
        self.backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.backoff(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        hint = getattr(exc, "retry_after", None)
        return max(wait, min(hint, RETRY_AFTER_MAX_S)) if hint else wait


def _retry_after(response: httpx.Response) -> float | None:
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:  # absent, or an HTTP date: the backoff decides
        return None
    return value if value >= 0 else None


def _retry_policy(max_retries: int) -> dict:
    return {
        "stop": stop_after_attempt(max_retries + 1),
        "wait": wait_retry_after(wait_exponential_jitter(initial=0.5, max=8)),
        "retry": retry_if_exception(_retryable),
        "reraise": True,
    }


def raise_for_error(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        error = error_for(response.status_code, body)
        error.retry_after = _retry_after(response)
        raise error
    return response


def client_options(connection: Connection, timeout: float) -> dict:
    headers = {"User-Agent": "qdpo-client/0.1"}
    if connection.api_key:
        headers["Authorization"] = f"Bearer {connection.api_key}"
    return {"base_url": connection.base_url, "headers": headers, "timeout": httpx.Timeout(timeout, connect=10.0)}


def connect(base_url: str | None, api_key: str | None, connection: Connection | None, http_client) -> Connection | None:
    """The connection a client uses: the one given, else resolved from arguments, environment and config (none for a ready-made http_client)."""
    if connection is not None or http_client is not None:
        return connection
    return resolve_connection(base_url, api_key)


def _unreachable(base_url, connection: Connection | None, exc: httpx.TransportError, *, answered: bool = False) -> APIConnectionError:
    what = "lost the connection to" if answered else "cannot reach"
    message = f"{what} the qdpo service at {base_url} ({type(exc).__name__}: {exc})"
    return APIConnectionError(f"{message}\n{connection.unreachable_hint()}" if connection else message)


def _explain(exc: APIError, connection: Connection | None) -> None:
    if isinstance(exc, AuthenticationError) and connection is not None:
        exc.hint = connection.unauthorized_hint()


class SyncHTTP:
    def __init__(self, http: httpx.Client, max_retries: int, connection: Connection | None = None):
        self.http, self.max_retries, self.connection = http, max_retries, connection

    def request(self, method: str, path: str, *, retries: int | None = None, **kwargs) -> httpx.Response:
        retries = self.max_retries if retries is None else retries
        try:
            for attempt in Retrying(**_retry_policy(retries)):
                with attempt:
                    return raise_for_error(self.http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise _unreachable(self.http.base_url, self.connection, exc) from exc
        except APIError as exc:
            _explain(exc, self.connection)
            raise
        raise AssertionError("unreachable")

    @contextmanager
    def stream(self, method: str, path: str, **kwargs) -> Iterator[httpx.Response]:
        """A streamed response (not retried), with the same errors as `request`."""
        answered = False
        try:
            with self.http.stream(method, path, **kwargs) as response:
                answered = True
                if response.status_code >= 400:
                    response.read()
                    try:
                        raise_for_error(response)
                    except APIError as exc:
                        _explain(exc, self.connection)
                        raise
                yield response
        except httpx.TransportError as exc:
            raise _unreachable(self.http.base_url, self.connection, exc, answered=answered) from exc

    def json(self, method: str, path: str, **kwargs):
        return self.request(method, path, **kwargs).json()


class AsyncHTTP:
    def __init__(self, http: httpx.AsyncClient, max_retries: int, connection: Connection | None = None):
        self.http, self.max_retries, self.connection = http, max_retries, connection

    async def request(self, method: str, path: str, *, retries: int | None = None, **kwargs) -> httpx.Response:
        retries = self.max_retries if retries is None else retries
        try:
            async for attempt in AsyncRetrying(**_retry_policy(retries)):
                with attempt:
                    return raise_for_error(await self.http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise _unreachable(self.http.base_url, self.connection, exc) from exc
        except APIError as exc:
            _explain(exc, self.connection)
            raise
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs) -> AsyncIterator[httpx.Response]:
        answered = False
        try:
            async with self.http.stream(method, path, **kwargs) as response:
                answered = True
                if response.status_code >= 400:
                    await response.aread()
                    try:
                        raise_for_error(response)
                    except APIError as exc:
                        _explain(exc, self.connection)
                        raise
                yield response
        except httpx.TransportError as exc:
            raise _unreachable(self.http.base_url, self.connection, exc, answered=answered) from exc

    async def json(self, method: str, path: str, **kwargs):
        return (await self.request(method, path, **kwargs)).json()
