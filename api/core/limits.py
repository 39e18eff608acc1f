"""Refuse oversized request bodies before reading them into memory or onto disk.

Two limits: a file upload (`POST /v1/files`) may be as large as QDPO_MAX_UPLOAD_BYTES (plus
multipart overhead; the files route then checks the file's own size exactly), every other
request body (a job is a few kilobytes of JSON) only QDPO_MAX_REQUEST_BYTES. A declared
Content-Length over the limit is answered 413 at once; a body sent without one is counted as it
streams and cut off when it crosses the limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPART_SLACK = 1024 * 1024
UPLOAD_PATHS = ("/v1/files",)


@dataclass(frozen=True)
class Limit:
    bytes: int  # what the message names
    allowed: int  # what is enforced (with slack for multipart framing)
    code: str
    param: str | None
    message: str


def upload_limit(max_upload_bytes: int) -> Limit:
    return Limit(
        max_upload_bytes,
        max_upload_bytes + MULTIPART_SLACK,
        "file_too_large",
        "file",
        f"file: the request is larger than this deployment's limit of {max_upload_bytes:,} bytes; split the file or ask the operator to raise QDPO_MAX_UPLOAD_BYTES",
    )


def request_limit(max_request_bytes: int) -> Limit:
    return Limit(
        max_request_bytes,
        max_request_bytes,
        "request_too_large",
        None,
        f"the request body is larger than this deployment's limit of {max_request_bytes:,} bytes for requests other than file uploads "
        "(QDPO_MAX_REQUEST_BYTES); send a smaller body (a job's settings fit in a few kilobytes)",
    )


class _BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing passes it on instead of turning it into a 400;
    # api.core.errors renders it with the code and param carried here.
    def __init__(self, limit: Limit):
        super().__init__(413, limit.message)
        self.code, self.param = limit.code, limit.param


def _error_body(limit: Limit) -> bytes:
    return json.dumps({"error": {"code": limit.code, "message": limit.message, "param": limit.param}}).encode()


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_upload_bytes: int, max_request_bytes: int):
        self.app = app
        self.uploads = upload_limit(max_upload_bytes)
        self.requests = request_limit(max_request_bytes)

    def limit_for(self, scope: Scope) -> Limit:
        is_upload = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") in UPLOAD_PATHS
        return self.uploads if is_upload else self.requests

    async def _reject(self, send: Send, limit: Limit) -> None:
        body = _error_body(limit)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit.allowed:
            await self._reject(send, limit)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.allowed:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send, limit)
