"""Asynchronous client: the same resources, methods and parameters as `Client`, awaited
(tests/test_client_parity.py holds them to it); `jobs.wait` draws no progress bar.

async with AsyncClient("http://localhost:8000", api_key=KEY) as c:
    job = await c.jobs.create(method={"type": "qdpo"}, quantization={"method": "nf4"})
    async for event in c.jobs.stream_events(job.id):
        print(event.message)
"""

from __future__ import annotations

import asyncio
import builtins
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from qdpo_client._common import (
    HashingWriter,
    SSEParser,
    attachment_name,
    expected_sha256,
    extract_and_verify,
    idempotency_headers,
    job_body,
    page_params,
    webhook_body,
)
from qdpo_client._http import AsyncHTTP, client_options, connect
from qdpo_client.config import Connection
from qdpo_client.errors import ConflictError, JobCancelled, JobFailed
from qdpo_client.types import Checkpoint, Event, File, Job, Metric, Model, Page, WebhookDelivery, WebhookEndpoint


class AsyncFiles:
    def __init__(self, http: AsyncHTTP):
        self._http = http

    async def upload(self, path: str | Path, purpose: str) -> File:
        path = Path(path)
        files = {"file": (path.name, path.read_bytes(), "application/jsonl")}
        return File.model_validate(await self._http.json("POST", "/v1/files", data={"purpose": purpose}, files=files, retries=0))

    async def list(self, *, purpose: str | None = None, after: str | None = None, limit: int | None = None) -> Page[File]:
        return Page[File].model_validate(await self._http.json("GET", "/v1/files", params=page_params(purpose=purpose, after=after, limit=limit)))

    async def get(self, file_id: str) -> File:
        return File.model_validate(await self._http.json("GET", f"/v1/files/{file_id}"))

    async def content(self, file_id: str) -> bytes:
        return (await self._http.request("GET", f"/v1/files/{file_id}/content")).content

    async def delete(self, file_id: str) -> dict:
        return await self._http.json("DELETE", f"/v1/files/{file_id}")


class AsyncJobs:
    def __init__(self, http: AsyncHTTP):
        self._http = http

    async def create(
        self,
        model: str = "smollm2-135m-instruct",
        *,
        quantization: dict | None = None,
        dataset: dict | None = None,
        method: dict | None = None,
        generation: dict | None = None,
        eval: dict | None = None,
        seed: int | None = None,
        suffix: str | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        body = job_body(
            model, quantization=quantization, dataset=dataset, method=method, generation=generation, eval=eval, seed=seed, suffix=suffix, metadata=metadata
        )
        return Job.model_validate(await self._http.json("POST", "/v1/jobs", json=body, headers=idempotency_headers(idempotency_key)))

    async def list(self, *, status: str | None = None, after: str | None = None, limit: int | None = None) -> Page[Job]:
        return Page[Job].model_validate(await self._http.json("GET", "/v1/jobs", params=page_params(status=status, after=after, limit=limit)))

    async def get(self, job_id: str) -> Job:
        return Job.model_validate(await self._http.json("GET", f"/v1/jobs/{job_id}"))

    async def cancel(self, job_id: str) -> Job:
        return Job.model_validate(await self._http.json("POST", f"/v1/jobs/{job_id}/cancel"))

    async def delete(self, job_id: str) -> dict:
        return await self._http.json("DELETE", f"/v1/jobs/{job_id}")

    async def events(self, job_id: str, *, after: str | None = None, limit: int | None = None, types: builtins.list[str] | None = None) -> Page[Event]:
        params = page_params(after=after, limit=limit, type=types)
        return Page[Event].model_validate(await self._http.json("GET", f"/v1/jobs/{job_id}/events", params=params))

    async def stream_events(self, job_id: str, *, after: str | None = None) -> AsyncIterator[Event]:
        params = page_params(after=after, stream="true")
        async with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/events", params=params, headers={"Accept": "text/event-stream"}, timeout=httpx.Timeout(60.0, read=None)
        ) as response:
            parser = SSEParser()
            async for line in response.aiter_lines():
                message = parser.feed(line)
                if message is None:
                    continue
                name, data, _ = message
                if name == "end":
                    return
                yield Event.model_validate(json.loads(data))

    async def metrics(self, job_id: str) -> builtins.list[Metric]:
        return [Metric.model_validate(m) for m in (await self._http.json("GET", f"/v1/jobs/{job_id}/metrics"))["data"]]

    async def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        return [Checkpoint.model_validate(c) for c in (await self._http.json("GET", f"/v1/jobs/{job_id}/checkpoints"))["data"]]

    async def report(self, job_id: str, *, markdown: bool = False) -> Any:
        if markdown:
            return (await self._http.request("GET", f"/v1/jobs/{job_id}/report", params={"format": "markdown"})).text
        return await self._http.json("GET", f"/v1/jobs/{job_id}/report")

    async def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 2.0,
        timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job ends; returns it when it succeeded, raises JobFailed / JobCancelled / TimeoutError.

        `on_event` gets every event once, in order; `on_update` the job after each poll. (No progress bar: that is the sync client's.)
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = None
        while True:
            job = await self.get(job_id)
            if on_update is not None:
                on_update(job)
            if on_event is not None:
                page = await self.events(job_id, after=cursor, limit=1000)
                for event in page.data:
                    on_event(event)
                cursor = page.data[-1].id if page.data else cursor
                if page.has_more:
                    continue
            if job.done:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            await asyncio.sleep(poll_interval)
        if job.status == "failed":
            raise JobFailed(job)
        if job.status == "cancelled":
            raise JobCancelled(job)
        return job

    async def download_adapter(self, job_id: str, dest: str | Path = ".", *, extract: bool = True) -> Path:
        job = await self.get(job_id)
        dest = Path(dest)
        writer = HashingWriter(dest / f"{job_id}-adapter.tar.gz")
        try:
            async with self._http.stream("GET", f"/v1/jobs/{job_id}/adapter") as response:
                expected = expected_sha256(response.headers, job.adapter.sha256 if job.adapter else None)
                size = int(response.headers["content-length"]) if "content-length" in response.headers else None
                async for chunk in response.aiter_bytes():
                    writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        archive = writer.finish(expected, size)
        return extract_and_verify(archive, dest / job_id) if extract else archive

    async def download_gguf(self, job_id: str, dest: str | Path = ".", *, model: bool = True) -> dict[str, Path]:
        """Download a GGUF job's adapter.gguf and (with `model`) its quantized model-<TYPE>.gguf into dest/<job id>/, sha256 verified.

        Then `llama-cli -m model-Q4_0.gguf --lora adapter.gguf` in that directory. A job that aligned a registered
        GGUF file has no model to download (that file is the one you registered): only the adapter comes back.
        """
        paths: dict[str, Path] = {}
        for kind in ("adapter", "model") if model else ("adapter",):
            writer = None
            try:
                async with self._http.stream("GET", f"/v1/jobs/{job_id}/gguf/{kind}") as response:
                    writer = HashingWriter(Path(dest) / job_id / attachment_name(response.headers, f"{kind}.gguf"))
                    expected = expected_sha256(response.headers, None)
                    size = int(response.headers["content-length"]) if "content-length" in response.headers else None
                    async for chunk in response.aiter_bytes():
                        writer.write(chunk)
            except ConflictError as exc:
                if kind == "model" and exc.code == "gguf_model_not_included":
                    continue
                raise
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            paths[kind] = writer.finish(expected, size)
        return paths


class AsyncWebhooks:
    def __init__(self, http: AsyncHTTP):
        self._http = http

    async def create(self, url: str, *, events: list[str] | None = None, description: str | None = None) -> WebhookEndpoint:
        return WebhookEndpoint.model_validate(await self._http.json("POST", "/v1/webhooks", json=webhook_body(url, events, description), retries=0))

    async def list(self) -> Page[WebhookEndpoint]:
        return Page[WebhookEndpoint].model_validate(await self._http.json("GET", "/v1/webhooks"))

    async def get(self, webhook_id: str) -> WebhookEndpoint:
        return WebhookEndpoint.model_validate(await self._http.json("GET", f"/v1/webhooks/{webhook_id}"))

    async def delete(self, webhook_id: str) -> dict:
        return await self._http.json("DELETE", f"/v1/webhooks/{webhook_id}")

    async def deliveries(self, webhook_id: str, *, status: str | None = None, after: str | None = None, limit: int | None = None) -> Page[WebhookDelivery]:
        params = page_params(status=status, after=after, limit=limit)
        return Page[WebhookDelivery].model_validate(await self._http.json("GET", f"/v1/webhooks/{webhook_id}/deliveries", params=params))


class AsyncModels:
    def __init__(self, http: AsyncHTTP):
        self._http = http

    async def list(self) -> list[Model]:
        return [Model.model_validate(m) for m in (await self._http.json("GET", "/v1/models"))["data"]]


class AsyncClient:
    """`AsyncClient(base_url, api_key)`; found like `Client`'s when not given (see `qdpo_client.config`)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        http_client: httpx.AsyncClient | None = None,
        connection: Connection | None = None,
    ):
        self.connection = connect(base_url, api_key, connection, http_client)
        if http_client is None:
            assert self.connection is not None  # connect() resolves one whenever no http_client is given
            http_client = httpx.AsyncClient(**client_options(self.connection, timeout))
        self.http = http_client
        transport = AsyncHTTP(self.http, max_retries, self.connection)
        self.files, self.jobs, self.models = AsyncFiles(transport), AsyncJobs(transport), AsyncModels(transport)
        self.webhooks = AsyncWebhooks(transport)
        self._transport = transport

    async def health(self) -> dict:
        return await self._transport.json("GET", "/readyz", retries=0)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.aclose()
