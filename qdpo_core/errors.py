"""Errors a caller of qdpo_core can act on.

Every user-caused error names the offending field (`param`) and says how to fix it, so the
service can turn it into a 4xx answer without parsing messages.
"""

from __future__ import annotations


class QdpoError(Exception):
    """Base class; `code` is stable and machine-readable, `param` names the field at fault."""

    code = "qdpo_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}


class SpecError(QdpoError):
    """A pipeline setting is invalid (unknown model, unsupported bits, bad hyperparameter)."""

    code = "invalid_spec"


class DataError(QdpoError):
    """A dataset is empty or malformed; `lines` lists every bad line with its field."""

    code = "invalid_file"

    def __init__(self, message: str, param: str | None = "file", lines: list[dict] | None = None):
        super().__init__(message, param)
        self.lines = lines or []

    def to_dict(self) -> dict:
        return {**super().to_dict(), "lines": self.lines}


class ModelUnavailable(QdpoError):
    """The model reference cannot be resolved or loaded on this machine."""

    code = "model_unavailable"


class Cancelled(QdpoError):
    """The caller asked to stop; everything finished so far is on disk."""

    code = "cancelled"
