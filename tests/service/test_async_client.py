"""The async client against the real API deployment."""

from __future__ import annotations

import asyncio

import pytest

from qdpo_client import AsyncClient, InvalidRequestError, JobCancelled, NotFoundError

from .helpers import PROMPTS, write_jsonl

pytestmark = pytest.mark.service


def test_async_client_round_trip(api_deployment, tenant_key, tmp_path):
    async def scenario():
        async with AsyncClient(api_deployment.base_url, api_key=tenant_key, max_retries=1) as client:
            models = await client.models.list()
            assert "smollm2-135m-instruct" in {m.id for m in models}
            uploaded = await client.files.upload(write_jsonl(tmp_path / "p.jsonl", *PROMPTS), "prompts")
            assert (await client.files.get(uploaded.id)).rows == len(PROMPTS)
            job = await client.jobs.create(dataset={"file_id": uploaded.id}, method={"type": "kd"}, suffix="async")
            assert job.status == "queued" and job.method["type"] == "kd"
            assert [j.id for j in (await client.jobs.list()).data] == [job.id]
            cancelled = await client.jobs.cancel(job.id)
            assert cancelled.status == "cancelled"
            streamed = [event.message async for event in client.jobs.stream_events(job.id)]
            assert streamed[-1] == "cancelled before it started"
            with pytest.raises(JobCancelled):
                await client.jobs.wait(job.id, poll_interval=0.1)
            with pytest.raises(InvalidRequestError) as bad:
                await client.jobs.create(method={"hyperparameters": {"epochs": -1}})
            assert bad.value.param == "method.hyperparameters.epochs"
            with pytest.raises(NotFoundError):
                await client.jobs.get("job_missing")

    asyncio.run(scenario())


def test_async_file_content_event_types_and_health(api_deployment, tenant_key, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", *PROMPTS)

    async def scenario():
        async with AsyncClient(api_deployment.base_url, api_key=tenant_key, max_retries=1) as client:
            health = await client.health()
            assert health["status"] == "ready" and health["checks"]["database"].startswith("ok")
            uploaded = await client.files.upload(path, "prompts")
            assert await client.files.content(uploaded.id) == path.read_bytes()  # exactly as uploaded
            job = await client.jobs.create(dataset={"file_id": uploaded.id}, method={"type": "qdpo"})
            await client.jobs.cancel(job.id)
            everything = (await client.jobs.events(job.id)).data
            assert {e.type for e in everything} >= {"status"}
            status = (await client.jobs.events(job.id, types=["status"])).data
            assert status and [e.id for e in status] == [e.id for e in everything if e.type == "status"]
            assert (await client.jobs.events(job.id, types=["checkpoint"])).data == []
            with pytest.raises(NotFoundError):
                await client.files.content("file_missing")

    asyncio.run(scenario())


def test_async_wait_with_events_then_the_markdown_report(worker_deployment):
    from .conftest import TINY_JOB

    async def scenario():
        async with AsyncClient(worker_deployment.base_url, api_key=worker_deployment.admin_key, max_retries=1) as client:
            job = await client.jobs.create(**TINY_JOB, suffix="async")
            seen, updates = [], []
            job = await client.jobs.wait(job.id, poll_interval=0.3, timeout=240, on_event=seen.append, on_update=updates.append)
            assert job.status == "succeeded" and updates[-1].status == "succeeded"
            every = []
            cursor = None
            while True:
                page = await client.jobs.events(job.id, after=cursor, limit=1000)
                every += page.data
                if not page.has_more:
                    break
                cursor = page.next_cursor
            assert [e.id for e in seen] == [e.id for e in every]  # each event once, in order
            markdown = await client.jobs.report(job.id, markdown=True)
            assert isinstance(markdown, str) and markdown.startswith("# qdpo report")
            report = await client.jobs.report(job.id)
            assert report["model"] == "tiny" and {"fp", "ptq", "aligned"} <= set(report)
            stages = (await client.jobs.events(job.id, types=["stage"])).data
            assert stages and {e.type for e in stages} == {"stage"}

    asyncio.run(scenario())
