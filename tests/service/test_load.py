"""Many concurrent clients against the real API on Postgres: every request is answered.

A correctness test, not a speed test (bench/api_load.py measures speed): 64 clients at once, each
on its own keep-alive connection, read jobs, list them, page events and create jobs, against an
API whose pool is far smaller than the crowd. Before, requests held pooled connections "idle in
transaction" while they waited for a thread, and the threads waited for a connection: nothing was
answered for 30 s, then 500s. Now every request must get its 200/201, and afterwards no connection
is left idle in a transaction.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from .conftest import _deployment, _teardown
from .infra import wait_for

pytestmark = pytest.mark.service
CLIENTS = 64
ROUNDS = 6


@pytest.fixture(scope="module")
def small_pool_deployment(tmp_path_factory):
    # 3 pooled connections and 8 threads for 64 clients; waits are allowed to be long, failures are not.
    overrides = {"db_pool_size": 3, "db_max_overflow": 2, "api_threads": 8, "db_pool_timeout_seconds": 120, "api_key_cache_seconds": 0}
    deployment, cleanup = _deployment("load", tmp_path_factory, overrides)
    yield deployment
    _teardown(cleanup)


async def _one_client(base_url: str, key: str, job_id: str, n: int) -> list[tuple[str, int]]:
    answers = []
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=300) as http:
        for round_ in range(ROUNDS):
            kind = ("get", "list", "events", "create", "get", "list")[(n + round_) % ROUNDS]
            if kind == "get":
                response = await http.get(f"/v1/jobs/{job_id}")
            elif kind == "list":
                response = await http.get("/v1/jobs", params={"limit": 20})
            elif kind == "events":
                response = await http.get(f"/v1/jobs/{job_id}/events")
            else:
                response = await http.post("/v1/jobs", json={}, headers={"Idempotency-Key": f"load-{n}-{round_}"})
            answers.append((kind, response.status_code))
    return answers


def test_64_concurrent_clients_are_all_answered(small_pool_deployment):
    deployment = small_pool_deployment
    keys = [deployment.new_key(f"load-{secrets.token_hex(3)}") for _ in range(4)]  # several tenants, no key cache: every request checks its key
    job_ids = []
    for key in keys:
        with httpx.Client(base_url=deployment.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            job_ids.append(http.post("/v1/jobs", json={}).json()["id"])

    async def crowd():
        return await asyncio.gather(*(_one_client(deployment.base_url, keys[n % 4], job_ids[n % 4], n) for n in range(CLIENTS)))

    started = time.monotonic()
    answers = [answer for client in asyncio.run(crowd()) for answer in client]
    elapsed = time.monotonic() - started
    assert len(answers) == CLIENTS * ROUNDS
    wrong = [(kind, status) for kind, status in answers if status != (201 if kind == "create" else 200)]
    assert not wrong, f"{len(wrong)} of {len(answers)} requests failed in {elapsed:.1f} s: {wrong[:10]}"

    # Every created job is there once (idempotency keys held under the crowd too) …
    with deployment.sessions() as session:
        from service.tables import Job

        created = session.scalars(sa.select(Job.idempotency_key).where(Job.idempotency_key.like("load-%"))).all()
    assert len(created) == len(set(created)) == sum(kind == "create" for kind, _ in answers)
    # … and no connection of the API sits idle in a transaction once the crowd is gone.
    database = sa.engine.make_url(deployment.settings.resolved_database_url).database
    with deployment.sessions() as session:
        idle_in_transaction = session.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"),
            {"db": database},
        ).scalar()
    assert idle_in_transaction == 0


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_qdpo_api_runs_several_processes(api_deployment, tenant_key):
    """`qdpo api --workers 2`: two server processes behind one port, each answering with its own pool."""
    from qdpo_cli.demo import free_port

    from .infra import REPO

    port = free_port()
    env = {**api_deployment.env, "QDPO_RECONCILE_INTERVAL_SECONDS": "0"}
    command = [sys.executable, "-m", "qdpo_cli.main", "api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    server = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert server.poll() is None, f"qdpo api exited with {server.returncode}"
            try:
                return httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, 0.3, what="qdpo api --workers 2")
        wait_for(lambda: len(_children(server.pid)) >= 2, 30, 0.3, what="two API processes")

        async def crowd():
            async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {tenant_key}"}, timeout=120) as http:
                return await asyncio.gather(*(http.get("/v1/jobs", params={"limit": 5}) for _ in range(CLIENTS)))

        assert {response.status_code for response in asyncio.run(crowd())} == {200}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
