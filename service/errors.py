"""Domain errors of the service layer. The API maps each class to one HTTP status (api/core/errors.py).

Every error carries a stable `code`, a message that names the field and the fix, and `param`, the
request field at fault as the client wrote it. The workers and the command line use the same
classes without any web code.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    code = "service_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        self.param = param
        self.extra = extra
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param, **self.extra}


class InvalidInput(ServiceError):
    """A request value the service cannot use (bad cursor, bad id, reused idempotency key …)."""

    code = "invalid_request"


class NotFound(ServiceError):
    """No such object for this tenant: the same answer whether it never existed or is another tenant's."""

    code = "not_found"


class Conflict(ServiceError):
    """The object's current state does not allow the operation."""

    code = "conflict"


class Unavailable(ServiceError):
    """A dependency (database, broker) cannot be reached right now; retrying later can succeed."""

    code = "unavailable"

    def __init__(self, message: str, param: str | None = None, code: str | None = None, retry_after: int = 5, **extra: Any):
        super().__init__(message, param, code, **extra)
        self.retry_after = retry_after


def not_found(kind: str, object_id: str, param: str | None = None) -> NotFound:
    shown = object_id if len(object_id) <= 80 else object_id[:80] + "…"
    return NotFound(f"no {kind} with id {shown!r}", param=param or f"{kind}_id", code=f"{kind}_not_found")
