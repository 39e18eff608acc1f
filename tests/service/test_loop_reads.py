"""The API's event-loop reads (api.deps.LoopReads) against the real Postgres.

GET of a job is awaited on the event loop over asyncio connections, so it needs no thread: it must
answer while every thread of the pool is taken, where the thread path waits. A pooled connection
that the server ended is replaced before use, as in the threads' pool, instead of failing a request.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest
from sqlalchemy import text

from api.deps import LoopReads
from service.config import Settings
from service.crud import jobs as jobs_crud

pytestmark = pytest.mark.service


def _reads(deployment, **overrides) -> LoopReads:
    from api.main import create_app

    settings = Settings(**{**deployment.settings.model_dump(), **overrides})
    return create_app(settings).state.reads


def _job_query(deployment):
    import httpx

    job_id = httpx.post(deployment.base_url + "/v1/jobs", json={}, headers={"Authorization": f"Bearer {deployment.admin_key}"}, timeout=30).json()["id"]
    with deployment.sessions() as session:
        from service.tables import Job

        tenant_id = session.query(Job).filter_by(id=job_id).one().tenant_id
    return job_id, jobs_crud.shown_job_query(tenant_id=tenant_id, job_id=job_id)


def test_a_job_is_read_on_the_event_loop_while_every_thread_is_taken(api_deployment):
    job_id, query = _job_query(api_deployment)
    reads = _reads(api_deployment)

    async def scenario() -> tuple[str, bool]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 1
        holder = object()
        await limiter.acquire_on_behalf_of(holder)  # the only thread is busy
        try:
            reads.open()
            assert reads.engine is not None  # Postgres: asyncio connections
            row = await asyncio.wait_for(reads.first(*query), 10)
            await reads.close()
            # The thread path (another database, or no lifespan) cannot answer while the thread is taken:
            # what makes this test fail if the read went back to a thread.
            assert reads.engine is None
            try:
                await asyncio.wait_for(reads.first(*query), 1)
                waited = False
            except asyncio.TimeoutError:
                waited = True
        finally:
            limiter.release_on_behalf_of(holder)
        return row.id, waited

    found, thread_path_waited = asyncio.run(scenario())
    assert found == job_id
    assert thread_path_waited


def test_a_read_connection_the_server_ended_is_replaced(api_deployment):
    job_id, query = _job_query(api_deployment)
    reads = _reads(api_deployment, db_read_concurrency=1)  # one connection: the next read must reuse or replace it

    async def scenario() -> list[str]:
        reads.open()
        try:
            backend = (await reads.first(text("SELECT pg_backend_pid() AS pid"), {})).pid
            with api_deployment.sessions() as session:
                assert session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend}).scalar()
            await asyncio.sleep(0.2)  # the server's goodbye reaches the pooled connection's socket
            found = [(await reads.first(*query)).id]
            found.append((await reads.first(text("SELECT pg_backend_pid() AS pid"), {})).pid != backend)
            return found
        finally:
            await reads.close()

    found, replaced = asyncio.run(scenario())
    assert found == job_id and replaced
