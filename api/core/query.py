"""Empty query values mean "not given": `GET /v1/jobs?status=&after=&limit=` lists the first page.

Forms and scripts often send every parameter, filled or not (the README's own example does). The
query string is rewritten before routing, leaving out every `name=` (and bare `name`) whose value
is empty; everything else is passed on byte for byte.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


def without_empty_values(query: bytes) -> bytes:
    kept = [part for part in query.split(b"&") if part.partition(b"=")[2]]
    return b"&".join(kept)


class EmptyQueryValuesMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("query_string"):
            scope = {**scope, "query_string": without_empty_values(scope["query_string"])}
        await self.app(scope, receive, send)
