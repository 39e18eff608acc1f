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
                await client.jobs.create(method={"hyperparameters": {"epochs": 0}})
            assert bad.value.param == "method.hyperparameters.epochs"
            with pytest.raises(NotFoundError):
                await client.jobs.get("job_missing")

    asyncio.run(scenario())
