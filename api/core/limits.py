"""Refuse oversized request bodies before reading them into memory or onto disk.

A declared Content-Length over the limit is answered 413 at once; a body sent without one is
counted as it streams and cut off when it crosses the limit. The files route then checks the
file's own size exactly (the limit here allows for multipart overhead).
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPART_SLACK = 1024 * 1024


def too_large_message(limit: int) -> str:
    return f"file: the request is larger than this deployment's limit of {limit:,} bytes; split the file or ask the operator to raise QDPO_MAX_UPLOAD_BYTES"


class _BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing passes it on instead of turning it into a 400.
    def __init__(self, limit: int):
        super().__init__(413, too_large_message(limit))


def _error_body(limit: int) -> bytes:
    return json.dumps({"error": {"code": "file_too_large", "message": too_large_message(limit), "param": "file"}}).encode()


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_upload_bytes: int):
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.limit = max_upload_bytes + MULTIPART_SLACK

    async def _reject(self, send: Send) -> None:
        body = _error_body(self.max_upload_bytes)
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
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(self.max_upload_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send)
