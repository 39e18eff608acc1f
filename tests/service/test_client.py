"""Client behaviour that a healthy server never shows: retries, typed errors, a corrupted download.

The network is replaced by httpx.MockTransport here (our own code runs unchanged on both sides of it).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import httpx
import pytest

from qdpo_client import APIConnectionError, ChecksumMismatch, Client, InvalidRequestError, JobFailed, ServerError

pytestmark = pytest.mark.service

JOB = {"id": "job_1", "object": "job", "status": "queued", "model": "m", "created_at": 1}


def client_for(handler, retries: int = 2) -> Client:
    return Client(http_client=httpx.Client(base_url="http://qdpo.test", transport=httpx.MockTransport(handler)), max_retries=retries)


def test_retries_5xx_and_sends_one_idempotency_key():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("idempotency-key"))
        if len(seen) < 3:
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "try later", "param": None}})
        return httpx.Response(201, json=JOB)

    assert client_for(handler).jobs.create(method={"type": "qdpo"}).id == "job_1"
    assert len(seen) == 3 and len(set(seen)) == 1 and seen[0].startswith("qdpo-client-")


def test_gives_up_after_the_retries_with_the_servers_message():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(500, json={"error": {"code": "internal_error", "message": "boom", "param": None}})

    with pytest.raises(ServerError) as raised:
        client_for(handler, retries=1).jobs.get("job_1")
    assert len(calls) == 2 and raised.value.code == "internal_error" and raised.value.message == "boom"


def test_4xx_is_not_retried_and_is_typed():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(
            422,
            json={
                "error": {
                    "code": "invalid_file",
                    "message": "file: line 2: bad",
                    "param": "file",
                    "lines": [{"line": 2, "field": "prompt", "message": "missing"}],
                }
            },
        )

    with pytest.raises(InvalidRequestError) as raised:
        client_for(handler).jobs.get("job_1")
    assert len(calls) == 1 and raised.value.param == "file" and raised.value.lines[0]["line"] == 2


def test_connection_errors_are_retried_then_reported():
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(APIConnectionError):
        client_for(handler, retries=2).jobs.list()
    assert len(calls) == 3


def test_wait_raises_job_failed_with_the_servers_error():
    failed = {**JOB, "status": "failed", "error": {"code": "model_unavailable", "message": "model: gone", "param": "model"}}
    with pytest.raises(JobFailed) as raised:
        client_for(lambda request: httpx.Response(200, json=failed)).jobs.wait("job_1", progress=False)
    assert raised.value.job.error["param"] == "model" and "model_unavailable" in str(raised.value)


def _archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"{}"
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("corrupt", [False, True])
def test_download_verifies_the_sha256(tmp_path, corrupt):
    archive = _archive()
    digest = hashlib.sha256(archive).hexdigest()
    body = archive[:-1] + bytes([archive[-1] ^ 1]) if corrupt else archive

    def handler(request):
        if request.url.path.endswith("/adapter"):
            return httpx.Response(200, content=body, headers={"ETag": f'"{digest}"', "X-Content-SHA256": digest})
        return httpx.Response(200, json={**JOB, "status": "succeeded", "adapter": {"bytes": len(archive), "sha256": digest, "url": "/v1/jobs/job_1/adapter"}})

    client = client_for(handler)
    if corrupt:
        with pytest.raises(ChecksumMismatch):
            client.jobs.download_adapter("job_1", tmp_path)
        assert list(tmp_path.iterdir()) == []  # nothing half-downloaded is left behind
    else:
        out = client.jobs.download_adapter("job_1", tmp_path)
        assert json.loads((out / "manifest.json").read_text()) == {}
