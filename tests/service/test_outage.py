"""The database outage drill: Postgres becomes unreachable while a real worker trains a job.

The API (uvicorn in a thread) and a real Celery worker process reach Postgres through a TCP proxy
this test controls; nothing else on the shared server is touched. `block()` cuts every open
connection and leaves new ones unanswered, as a crashed or partitioned server does: a client only
notices through its connect timeout. While it lasts, every API route that needs the database must
answer 503 with Retry-After and the usual error body, on a keep-alive connection that stays usable;
liveness stays 200 and readiness 503. The worker must keep training, keep what it reports in its
spool, and once the database is back write all of it, in order and once, then record the result —
the job succeeds in its first attempt with complete events, metrics and checkpoints.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from qdpo_core.events import STAGES

from .conftest import TINY_JOB
from .infra import PG_BASE_URL, REDIS_URL, Deployment, LiveServer, WorkerProcess, clear_redis_queue, create_database, drop_database, settings_env, wait_for

pytestmark = pytest.mark.service
JOB_TIMEOUT = 300


class PostgresProxy:
    """A TCP proxy in front of Postgres that a test can cut and restore (asyncio, in a thread of its own)."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.blocked = False
        self.accepted_while_blocked = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:  # accepted by the kernel, never answered: the client waits for its connect timeout
            self.accepted_while_blocked += 1
            self._held.add(writer)
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, upstream_writer)
        self._pairs.add(pair)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self._pairs.discard(pair)

    async def _block(self) -> None:
        self.blocked = True
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()

    async def _unblock(self) -> None:
        self.blocked = False
        for writer in list(self._held):
            writer.transport.abort()
        self._held.clear()

    def block(self) -> None:
        self._call(self._block())

    def unblock(self) -> None:
        self._call(self._unblock())

    async def _shutdown(self) -> None:
        await self._unblock()
        self._server.close()
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()
        await asyncio.sleep(0.1)  # let the aborted transports finish on this loop
        for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            task.cancel()

    def close(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def outage_deployment(tmp_path_factory, tiny_model_dir):
    """API + worker whose every database connection goes through a PostgresProxy."""
    from sqlalchemy.engine import make_url

    from api.main import create_app
    from service.config import Settings
    from service.migrate import upgrade

    db_name, direct_url = create_database("qdpo_test_outage")
    upstream = make_url(PG_BASE_URL)
    proxy = PostgresProxy(upstream.host or "127.0.0.1", upstream.port or 5432)
    proxied_url = make_url(direct_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    queue = f"qdpo_test_outage_{secrets.token_hex(4)}"
    root = tmp_path_factory.mktemp("deployment-outage")
    values = {
        "database_url": proxied_url,
        "broker_url": REDIS_URL,
        "queue_name": queue,
        "var_dir": str(root / "var"),
        "artifact_dir": str(root / "artifacts"),
        "extra_models": {"tiny": str(tiny_model_dir)},
        # The lease outlasts the outage (as the production 120 s do a 20 s one): the job stays this worker's.
        "lease_seconds": 90,
        "heartbeat_seconds": 1,
        "cancel_poll_seconds": 0.3,
        "reconcile_interval_seconds": 1,
        "requeue_after_seconds": 3,
        "retry_backoff_seconds": 1,
        "db_connect_timeout_seconds": 2,
        "db_pool_timeout_seconds": 5,
        "db_retry_after_seconds": 3,
    }
    settings = Settings(**values)
    upgrade(direct_url)
    server = LiveServer(create_app(settings)).start()
    deployment = Deployment(name="outage", settings=settings, base_url=server.url, admin_key="", server=server, env=settings_env(values))
    deployment.admin_key = deployment.new_key("tenant-outage")
    deployment.proxy = proxy
    deployment.worker = WorkerProcess(deployment.env, tmp_path_factory.mktemp("outage-worker-log") / "worker.log").start()
    yield deployment
    proxy.unblock()
    deployment.worker.stop()
    server.stop()
    clear_redis_queue(queue)
    drop_database(db_name)
    proxy.close()


def raw_exchange(base_url: str, key: str, requests: list[tuple[str, str, bytes | None]]) -> list[tuple[int, dict, dict]]:
    """Send the requests one after another on ONE TCP connection; (status, headers, JSON body) of each answer.

    Fails if the server closes the connection after an answer: the keep-alive connection must stay usable.
    """
    host, port = base_url.removeprefix("http://").split(":")
    answers = []
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        stream = sock.makefile("rb")
        for method, path, body in requests:
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            sock.sendall((head + "\r\n").encode() + (body or b""))
            status_line = stream.readline()
            assert status_line, f"the server closed the connection instead of answering {method} {path}"
            status = int(status_line.split()[1])
            headers = {}
            while (line := stream.readline()) not in (b"\r\n", b""):
                name, value = line.decode().split(":", 1)
                headers[name.strip().lower()] = value.strip()
            payload = stream.read(int(headers.get("content-length", 0)))
            answers.append((status, headers, json.loads(payload) if payload else {}))
            assert headers.get("connection", "").lower() != "close", f"{method} {path} answered {status} and closed the connection"
    return answers


def spooled(workdir: Path) -> list[dict]:
    from worker.recorder import SPOOL_NAME

    path = workdir / SPOOL_NAME
    if not path.is_file():
        return []
    return [json.loads(line)["entry"] for line in path.read_text().splitlines() if line.strip() and "entry" in json.loads(line)]


def all_events(client, job_id: str) -> list:
    events, cursor = [], None
    while True:
        page = client.jobs.events(job_id, after=cursor, limit=1000)
        events += page.data
        if not page.has_more:
            return events
        cursor = page.next_cursor


def test_a_database_outage_mid_training_is_a_503_and_loses_no_history(outage_deployment):
    from qdpo_client import Client
    from service.storage import ArtifactStore
    from service.tables import Job

    deployment, proxy = outage_deployment, outage_deployment.proxy
    client = deployment.client()
    unused_key = deployment.new_key("tenant-outage-2")  # never used before the outage: not in any cache
    body = copy.deepcopy(TINY_JOB)
    body["method"]["hyperparameters"].update(epochs=4, batch_size=2, checkpoint_every=1, early_stopping_patience=0)  # 16 steps, a checkpoint each
    job = client.jobs.create(**body)
    with deployment.sessions() as session:
        tenant_id = session.query(Job).filter_by(id=job.id).one().tenant_id
    workdir = ArtifactStore(deployment.settings.resolved_artifact_dir).workdir(tenant_id, job.id)
    wait_for(lambda: len(client.jobs.metrics(job.id)) >= 1, JOB_TIMEOUT, 0.1, what="the first training step")

    proxy.block()
    blocked_at = time.monotonic()
    try:
        # Every route that needs the database: 503, Retry-After, the error envelope; the connection stays open.
        answers = raw_exchange(
            deployment.base_url,
            deployment.admin_key,
            [
                ("GET", f"/v1/jobs/{job.id}", None),
                ("POST", "/v1/jobs", json.dumps(body).encode()),
                ("GET", "/v1/jobs?limit=20", None),
                ("GET", f"/v1/jobs/{job.id}/events", None),
                ("GET", "/healthz", None),
                ("GET", "/readyz", None),
            ],
        )
        for (status, headers, payload), what in zip(answers[:4], ("get", "create", "list", "events")):
            assert status == 503, (what, status, payload)
            assert payload["error"]["code"] == "database_unavailable" and payload["error"]["message"], payload
            assert headers["retry-after"] == "3", headers
        assert answers[4][0] == 200 and answers[4][2] == {"status": "ok"}  # liveness: the process is fine
        assert answers[5][0] == 503 and answers[5][2]["checks"]["database"].startswith("unavailable")
        # A key the API has not seen yet cannot be checked either: 503, not 401.
        (status, _, payload), *_ = raw_exchange(deployment.base_url, unused_key, [("GET", f"/v1/jobs/{job.id}", None)])
        assert (status, payload["error"]["code"]) == (503, "database_unavailable")
        assert time.monotonic() - blocked_at < 60  # answers come within the connect timeout, nothing hangs

        # The worker trains on; what it reports waits in its spool.
        wait_for(lambda: sum(e["type"] == "metrics" for e in spooled(workdir)) >= 3, JOB_TIMEOUT, 0.3, what="training steps taken during the outage")
        assert proxy.accepted_while_blocked > 0  # the service really tried to reach the database

        # The client retries a 503 (honouring Retry-After) until the database is back.
        retried: dict = {}

        def get_with_retries() -> None:
            with Client(deployment.base_url, api_key=deployment.admin_key, max_retries=10, timeout=60) as patient:
                retried["job"] = patient.jobs.get(job.id)
                retried["at"] = time.monotonic()

        caller = threading.Thread(target=get_with_retries)
        caller.start()
        time.sleep(4)
    finally:
        unblocked_at = time.monotonic()
        proxy.unblock()
    caller.join(120)
    assert retried["job"].id == job.id and retried["at"] > unblocked_at  # it got 503s for 4 s and kept trying

    job = wait_for(lambda: (j := client.jobs.get(job.id)).status in ("succeeded", "failed", "cancelled") and j, JOB_TIMEOUT, 0.5, what="the job to end")
    assert job.status == "succeeded", job.error
    assert job.attempts == 1  # the attempt that lived through the outage recorded its own result: nothing ran twice

    events = all_events(client, job.id)
    assert [e.id for e in events] == [f"evt_{n}" for n in range(1, len(events) + 1)]  # unique, gap-free ids
    steps = list(range(1, 17))
    assert [e.step for e in events if e.type == "metrics"] == steps  # every step once, in order, none lost
    assert [e.step for e in events if e.type == "checkpoint"] == steps
    assert [(e.stage, e.message) for e in events if e.type == "stage"] == [(stage, edge) for stage in STAGES for edge in ("started", "finished")]
    assert events[-1].type == "status" and events[-1].message.startswith("succeeded")  # the result comes after everything it reported
    assert [m.step for m in client.jobs.metrics(job.id)] == steps
    checkpoints = client.jobs.checkpoints(job.id)
    assert [c.step for c in checkpoints] == steps and all({"kl", "token_flip_rate"} <= set(c.metrics) for c in checkpoints)
    report = client.jobs.report(job.id)
    assert [c.step for c in checkpoints if c.is_best] == ([report["selected_checkpoint"]] if report["selected_checkpoint"] else [])
    assert not spooled(workdir)  # everything written, the spool is gone
    created = [e.created_at for e in events if e.type == "metrics"]
    assert created == sorted(created)  # spooled events keep the time they happened
    log = deployment.worker.log_path.read_text(errors="replace")
    assert "keeping events in the spool" in log and "could not record event" not in log


def test_the_client_waits_as_long_as_retry_after_says():
    """A 503's Retry-After sets the client's next wait (capped), the backoff applies otherwise."""
    from tenacity import RetryCallState, Retrying
    from tenacity.wait import wait_fixed

    from qdpo_client._http import RETRY_AFTER_MAX_S, wait_retry_after
    from qdpo_client.errors import error_for

    def wait_after(retry_after: float | None) -> float:
        error = error_for(503, {"error": {"code": "database_unavailable", "message": "try again in 3 s", "param": None}})
        error.retry_after = retry_after
        state = RetryCallState(Retrying(), None, (), {})
        state.set_exception((type(error), error, None))
        return wait_retry_after(wait_fixed(0.5))(state)

    assert wait_after(3) == 3
    assert wait_after(None) == 0.5 and wait_after(0.1) == 0.5
    assert wait_after(3600) == RETRY_AFTER_MAX_S


def test_an_unexpected_error_is_a_500_that_keeps_the_connection_open(api_deployment):
    """A bug in a route answers the error envelope, and the client's keep-alive connection goes on serving."""
    from api.main import create_app

    app = create_app(api_deployment.settings)

    @app.get("/v1/broken")
    def broken() -> dict:
        raise RuntimeError("a bug")

    server = LiveServer(app).start()
    try:
        (status, _, payload), (after, _, health) = raw_exchange(server.url, api_deployment.admin_key, [("GET", "/v1/broken", None), ("GET", "/healthz", None)])
    finally:
        server.stop()
    assert (status, payload["error"]["code"]) == (500, "internal_error") and "a bug" not in payload["error"]["message"]
    assert (after, health) == (200, {"status": "ok"})
