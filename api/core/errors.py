"""One error shape for every failure: {"error": {"code", "message", "param", ...}}.

Routes raise `ApiError`; the service layer raises its domain errors (`service.errors`), which are
mapped to HTTP here and nowhere else; FastAPI's own validation errors and HTTP exceptions are
rewritten into the same envelope, with `param` as the dotted path of the offending field
(`method.hyperparameters.beta`) so a client can point at it without parsing the message.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


# The one place domain errors become HTTP statuses.
STATUS_OF = {InvalidInput: 422, NotFound: 404, Conflict: 409, Unavailable: 503}


def status_of(exc: ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def error_response(status_code: int, code: str, message: str, param: str | None = None, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"error": {"code": code, "message": message, "param": param, **extra}}, headers=headers)


def _field_path(loc: tuple | list) -> str | None:
    """('body', 'method', 'hyperparameters', 'beta') -> 'method.hyperparameters.beta'."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or (str(loc[-1]) if loc else None)


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content=exc.body(), headers=exc.headers)


async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
    return JSONResponse(status_code=status_of(exc), content={"error": exc.to_dict()}, headers=headers)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _field_path(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = "is required"
    elif first.get("type") == "extra_forbidden":
        message = "is not a known field; remove it (see the API reference at /docs)"
    elif first.get("type") == "json_invalid":
        message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    details = [{"param": _field_path(e.get("loc", ())), "message": e.get("msg")} for e in errors[:20]]
    return error_response(422, "invalid_request", f"{param}: {message}" if param else message, param, details=details)


_HTTP_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    param = "file" if exc.status_code == 413 else None  # only uploads are large enough to hit the limit
    if exc.status_code == 413:
        code = "file_too_large"
    return error_response(exc.status_code, code, str(exc.detail), param, headers=getattr(exc, "headers", None))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "the server failed to handle this request; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
