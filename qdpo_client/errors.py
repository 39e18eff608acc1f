"""Exceptions the client raises; API errors carry the server's code, message and field."""

from __future__ import annotations

from typing import Any


class QdpoClientError(Exception):
    """Base class of everything this package raises."""


class APIConnectionError(QdpoClientError):
    """The server could not be reached (after retries); the message says which URL, where it came from, and what to do."""


class APIError(QdpoClientError):
    """The server answered with an error: `code`, `message` and `param` (the field at fault)."""

    def __init__(self, status_code: int, code: str, message: str, param: str | None = None, body: dict | None = None):
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code, self.code, self.message, self.param = status_code, code, message, param
        self.body = body or {}
        self.retry_after: float | None = None  # the answer's Retry-After, in seconds (set by the transport)
        self.hint: str | None = None  # what to do about it, where the client knows more than the server (a 401: where the key came from)

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n{self.hint}" if self.hint else text

    @property
    def lines(self) -> list[dict[str, Any]]:
        """For an invalid upload: every bad line as {line, field, message}."""
        return self.body.get("error", {}).get("lines", [])


class AuthenticationError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class PayloadTooLargeError(APIError):
    pass


class InvalidRequestError(APIError):
    pass


class ServerError(APIError):
    pass


_BY_STATUS = {401: AuthenticationError, 404: NotFoundError, 409: ConflictError, 413: PayloadTooLargeError, 422: InvalidRequestError}


def error_for(status_code: int, body: Any) -> APIError:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    code = error.get("code", "http_error")
    message = error.get("message") or (body if isinstance(body, str) else "") or f"HTTP {status_code}"
    cls = ServerError if status_code >= 500 else _BY_STATUS.get(status_code, APIError)
    return cls(status_code, code, message, error.get("param"), body if isinstance(body, dict) else {})


class JobFailed(QdpoClientError):
    """`jobs.wait` saw the job fail; `.job.error` holds the server's {code, message, param}."""

    def __init__(self, job):
        error = job.error or {}
        super().__init__(f"job {job.id} failed: {error.get('code')}: {error.get('message')}")
        self.job = job


class JobCancelled(QdpoClientError):
    def __init__(self, job):
        super().__init__(f"job {job.id} was cancelled")
        self.job = job


class ChecksumMismatch(QdpoClientError):
    """A download's sha256 differs from the one the server announced: the file was not kept."""
