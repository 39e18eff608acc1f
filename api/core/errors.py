"""One error shape for every failure: {"error": {"code", "message", "param", ...}}.

Routes raise `ApiError`; the service layer raises its domain errors (`service.errors`), which are
mapped to HTTP here and nowhere else; FastAPI's own validation errors and HTTP exceptions are
rewritten into the same envelope, with `param` as the dotted path of the offending field
(`method.hyperparameters.beta`) so a client can point at it without parsing the message.

Error bodies may quote what the client sent; every string in them is made encodable first (a lone
surrogate is written as `\\ud800`), so an error about bad text can never become a 500 itself.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import database_unavailable
from service.errors import Conflict, InvalidInput, NotFound, ServiceError, Unavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status_code: int, code: str, message: str, param: str | None = None, headers: dict | None = None, **extra: Any):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers
        self.extra = extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "param": self.param, **self.extra}}


def encodable(value: Any) -> Any:
    """The value with every string made encodable as UTF-8 (lone surrogates backslash-escaped), at any depth."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {encodable(k): encodable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encodable(v) for v in value]
    return value


class ErrorJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return super().render(encodable(content))


# The one place domain errors become HTTP statuses.
STATUS_OF = {InvalidInput: 422, NotFound: 404, Conflict: 409, Unavailable: 503}


def status_of(exc: ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def error_response(status_code: int, code: str, message: str, param: str | None = None, headers: dict | None = None, **extra) -> JSONResponse:
    return ErrorJSONResponse(status_code=status_code, content={"error": {"code": code, "message": message, "param": param, **extra}}, headers=headers)


# Headers as clients spell them (FastAPI reports them lower-cased).
_HEADER_NAMES = {"idempotency-key": "Idempotency-Key", "last-event-id": "Last-Event-ID", "authorization": "Authorization"}


def _field_path(loc: tuple | list) -> str | None:
    """('body', 'method', 'hyperparameters', 'beta') -> 'method.hyperparameters.beta'; list items as `name[0]`.

    Union tags (`<array>`, see api.schemas.spec_models) are left out, and so is a dict key whose
    validation failed (it is the bad text itself): the error names the dict instead.
    """
    loc = list(loc)
    if loc and loc[-1] == "[key]":
        loc = loc[:-2]
    if len(loc) == 2 and loc[0] == "header" and isinstance(loc[1], str):
        return _HEADER_NAMES.get(loc[1].lower(), loc[1].title())
    path = ""
    for part in loc:
        if part in ("body", "query", "path", "header", "form") and not path:
            continue
        if isinstance(part, str) and part.startswith("<") and part.endswith(">"):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or (str(loc[-1]) if loc else None)


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return ErrorJSONResponse(status_code=exc.status_code, content=exc.body(), headers=exc.headers)


async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
    return ErrorJSONResponse(status_code=status_of(exc), content={"error": exc.to_dict()}, headers=headers)


async def _database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
    """The database is unreachable, restarting or saturated: 503 with Retry-After, as any Unavailable.

    Handled here rather than by the catch-all below, which answers and then re-raises (so the
    server closes the client's keep-alive connection); this answer leaves the connection usable.
    """
    settings = getattr(request.app.state, "settings", None)
    unavailable = database_unavailable(exc, retry_after=getattr(settings, "db_retry_after_seconds", 5))
    if unavailable is None:
        return await _unexpected(request, exc)
    log.warning("database unavailable for %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0][:300])
    return await _service_error(request, unavailable)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _field_path(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if tuple(first.get("loc", ()))[-1:] == ("[key]",):
        message = f"a key {message}"
    if first.get("type") == "missing":
        message = "is required"
    elif first.get("type") == "extra_forbidden":
        message = "is not a known field; remove it (see the API reference at /docs)"
    elif first.get("type") == "json_invalid":
        message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    elif param == "Idempotency-Key" and first.get("type") in ("string_pattern_mismatch", "string_too_long"):
        message = "use 1 to 255 printable ASCII characters, such as a UUID"
    details = [{"param": _field_path(e.get("loc", ())), "message": e.get("msg")} for e in errors[:20]]
    return error_response(422, "invalid_request", f"{param}: {message}" if param else message, param, details=details)


_HTTP_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (a 405's Allow header lists them all).

    Asked of the router itself, method by method: a route per method means no single route knows.
    """
    routes = request.app.router.routes
    return [method for method in HTTP_METHODS if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(getattr(exc, "headers", None) or {})
    message, param = str(exc.detail), None
    if exc.status_code == 413:  # a body over a limit (api.core.limits says which)
        code, param = getattr(exc, "code", "request_too_large"), getattr(exc, "param", None)
    if exc.status_code == 405:
        allowed = allowed_methods(request) or sorted(headers.get("Allow", "").replace(" ", "").split(","))
        headers["Allow"] = ", ".join(allowed)
        message = f"{request.method} is not supported here; use {', '.join(allowed)}"
    return error_response(exc.status_code, code, message, param, headers=headers or None)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "the server failed to handle this request; it has been logged")


class UnhandledErrorMiddleware:
    """Answers an unhandled exception with the 500 envelope and keeps the connection open.

    Starlette's own last-resort handler (the `Exception` handler below, kept for errors raised
    outside this middleware) sends the 500 and then re-raises, so the server closes the client's
    keep-alive connection and its next request fails with a read error.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # too late for an answer: let the server close the connection
                raise
            response = await _unexpected(Request(scope), exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types every handler as taking any Exception; each of these is only called with its own class.
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]
    app.add_exception_handler(SQLAlchemyError, _database_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(UnhandledErrorMiddleware)  # added first: the innermost of the app's middleware
