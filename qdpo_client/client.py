"""Synchronous client for the qdpo REST API.

from qdpo_client import Client
c = Client("http://localhost:8000", api_key=KEY)
f = c.files.upload("prompts.jsonl", purpose="prompts")
job = c.jobs.create(model="smollm2-135m-instruct", quantization={"method": "nf4"}, dataset={"file_id": f.id}, method={"type": "qdpo"})
job = c.jobs.wait(job.id)                      # progress bar; raises JobFailed with the server's error
path = c.jobs.download_adapter(job.id, "out/")  # sha256 verified, unpacked: out/<job id>/adapter/…
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterator
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
from qdpo_client._http import SyncHTTP, client_options, connect
from qdpo_client.config import Connection
from qdpo_client.errors import ConflictError, JobCancelled, JobFailed
from qdpo_client.progress import JobProgress
from qdpo_client.types import Checkpoint, Event, File, Job, Metric, Model, Page, WebhookDelivery, WebhookEndpoint


class Files:
    def __init__(self, http: SyncHTTP):
        self._http = http

    def upload(self, path: str | Path, purpose: str) -> File:
        """Upload a JSONL file; an invalid one raises InvalidRequestError whose `.lines` lists every bad line."""
        path = Path(path)
        content = path.read_bytes()
        # Retried only when nothing reached the server; a lost answer to an upload would store it twice.
        data = self._http.json("POST", "/v1/files", data={"purpose": purpose}, files={"file": (path.name, content, "application/jsonl")}, retries=0)
        return File.model_validate(data)

    def list(self, *, purpose: str | None = None, after: str | None = None, limit: int | None = None) -> Page[File]:
        return Page[File].model_validate(self._http.json("GET", "/v1/files", params=page_params(purpose=purpose, after=after, limit=limit)))

    def get(self, file_id: str) -> File:
        return File.model_validate(self._http.json("GET", f"/v1/files/{file_id}"))

    def content(self, file_id: str) -> bytes:
        return self._http.request("GET", f"/v1/files/{file_id}/content").content

    def delete(self, file_id: str) -> dict:
        return self._http.json("DELETE", f"/v1/files/{file_id}")


class Jobs:
    def __init__(self, http: SyncHTTP):
        self._http = http

    def create(
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
        """Create a job. Safe to retry: the same idempotency key never creates a second job."""
        body = job_body(
            model, quantization=quantization, dataset=dataset, method=method, generation=generation, eval=eval, seed=seed, suffix=suffix, metadata=metadata
        )
        return Job.model_validate(self._http.json("POST", "/v1/jobs", json=body, headers=idempotency_headers(idempotency_key)))

    def list(self, *, status: str | None = None, after: str | None = None, limit: int | None = None) -> Page[Job]:
        return Page[Job].model_validate(self._http.json("GET", "/v1/jobs", params=page_params(status=status, after=after, limit=limit)))

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._http.json("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._http.json("POST", f"/v1/jobs/{job_id}/cancel"))

    def delete(self, job_id: str) -> dict:
        return self._http.json("DELETE", f"/v1/jobs/{job_id}")

    def events(self, job_id: str, *, after: str | None = None, limit: int | None = None, types: builtins.list[str] | None = None) -> Page[Event]:
        params = page_params(after=after, limit=limit, type=types)
        return Page[Event].model_validate(self._http.json("GET", f"/v1/jobs/{job_id}/events", params=params))

    def stream_events(self, job_id: str, *, after: str | None = None) -> Iterator[Event]:
        """Yield events live (server-sent events) until the job ends."""
        params = page_params(after=after, stream="true")
        with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/events", params=params, headers={"Accept": "text/event-stream"}, timeout=httpx.Timeout(60.0, read=None)
        ) as response:
            parser = SSEParser()
            for line in response.iter_lines():
                message = parser.feed(line)
                if message is None:
                    continue
                name, data, _ = message
                if name == "end":
                    return
                yield Event.model_validate(json.loads(data))

    def metrics(self, job_id: str) -> builtins.list[Metric]:
        return [Metric.model_validate(m) for m in self._http.json("GET", f"/v1/jobs/{job_id}/metrics")["data"]]

    def checkpoints(self, job_id: str) -> builtins.list[Checkpoint]:
        return [Checkpoint.model_validate(c) for c in self._http.json("GET", f"/v1/jobs/{job_id}/checkpoints")["data"]]

    def report(self, job_id: str, *, markdown: bool = False) -> Any:
        if markdown:
            return self._http.request("GET", f"/v1/jobs/{job_id}/report", params={"format": "markdown"}).text
        return self._http.json("GET", f"/v1/jobs/{job_id}/report")

    def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 2.0,
        timeout: float | None = None,
        progress: bool = True,
        on_event: Callable[[Event], None] | None = None,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job ends; returns it when it succeeded, raises JobFailed / JobCancelled / TimeoutError.

        `progress` draws a bar on stderr; `on_event` gets every event once, in order; `on_update` the job after each poll.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = None
        with JobProgress(progress) as bar:
            while True:
                job = self.get(job_id)
                bar.update(job)
                if on_update is not None:
                    on_update(job)
                if on_event is not None:
                    page = self.events(job_id, after=cursor, limit=1000)
                    for event in page.data:
                        on_event(event)
                    cursor = page.data[-1].id if page.data else cursor
                    if page.has_more:
                        continue
                if job.done:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
                time.sleep(poll_interval)
        if job.status == "failed":
            raise JobFailed(job)
        if job.status == "cancelled":
            raise JobCancelled(job)
        return job

    def download_adapter(self, job_id: str, dest: str | Path = ".", *, extract: bool = True) -> Path:
        """Download the adapter archive, verify its sha256, and (by default) unpack it to dest/<job id>/."""
        job = self.get(job_id)
        dest = Path(dest)
        writer = HashingWriter(dest / f"{job_id}-adapter.tar.gz")
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/adapter") as response:
                expected = expected_sha256(response.headers, job.adapter.sha256 if job.adapter else None)
                size = int(response.headers["content-length"]) if "content-length" in response.headers else None
                for chunk in response.iter_bytes():
                    writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        archive = writer.finish(expected, size)
        return extract_and_verify(archive, dest / job_id) if extract else archive

    def download_gguf(self, job_id: str, dest: str | Path = ".", *, model: bool = True) -> dict[str, Path]:
        """Download a GGUF job's adapter.gguf and (with `model`) its quantized model-<TYPE>.gguf into dest/<job id>/, sha256 verified.

        Then `llama-cli -m model-Q4_0.gguf --lora adapter.gguf` in that directory. A job that aligned a registered
        GGUF file has no model to download (that file is the one you registered): only the adapter comes back.
        """
        paths: dict[str, Path] = {}
        for kind in ("adapter", "model") if model else ("adapter",):
            writer = None
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/gguf/{kind}") as response:
                    writer = HashingWriter(Path(dest) / job_id / attachment_name(response.headers, f"{kind}.gguf"))
                    expected = expected_sha256(response.headers, None)
                    size = int(response.headers["content-length"]) if "content-length" in response.headers else None
                    for chunk in response.iter_bytes():
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


class Webhooks:
    """Endpoints that receive signed job events (verify them with `qdpo_client.verify_webhook`)."""

    def __init__(self, http: SyncHTTP):
        self._http = http

    def create(self, url: str, *, events: list[str] | None = None, description: str | None = None) -> WebhookEndpoint:
        """Register an endpoint; the answer's `secret` (whsec_…) is shown only this once."""
        # Not retried: a lost answer would leave an endpoint whose secret nobody saw.
        return WebhookEndpoint.model_validate(self._http.json("POST", "/v1/webhooks", json=webhook_body(url, events, description), retries=0))

    def list(self) -> Page[WebhookEndpoint]:
        return Page[WebhookEndpoint].model_validate(self._http.json("GET", "/v1/webhooks"))

    def get(self, webhook_id: str) -> WebhookEndpoint:
        return WebhookEndpoint.model_validate(self._http.json("GET", f"/v1/webhooks/{webhook_id}"))

    def delete(self, webhook_id: str) -> dict:
        return self._http.json("DELETE", f"/v1/webhooks/{webhook_id}")

    def deliveries(self, webhook_id: str, *, status: str | None = None, after: str | None = None, limit: int | None = None) -> Page[WebhookDelivery]:
        """What was sent to the endpoint, newest first, with every attempt's status code or error."""
        params = page_params(status=status, after=after, limit=limit)
        return Page[WebhookDelivery].model_validate(self._http.json("GET", f"/v1/webhooks/{webhook_id}/deliveries", params=params))


class Models:
    def __init__(self, http: SyncHTTP):
        self._http = http

    def list(self) -> list[Model]:
        return [Model.model_validate(m) for m in self._http.json("GET", "/v1/models")["data"]]


class Client:
    """`Client(base_url, api_key)`; what is not given is found as `qdpo_client.config` says: QDPO_BASE_URL /
    QDPO_API_KEY, QDPO_HOST / QDPO_PORT, then the client config `qdpo serve` writes."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        http_client: httpx.Client | None = None,
        connection: Connection | None = None,
    ):
        self.connection = connect(base_url, api_key, connection, http_client)
        if http_client is None:
            assert self.connection is not None  # connect() resolves one whenever no http_client is given
            http_client = httpx.Client(**client_options(self.connection, timeout))
        self.http = http_client
        transport = SyncHTTP(self.http, max_retries, self.connection)
        self.files, self.jobs, self.models = Files(transport), Jobs(transport), Models(transport)
        self.webhooks = Webhooks(transport)
        self._transport = transport

    def health(self) -> dict:
        return self._transport.json("GET", "/readyz", retries=0)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
