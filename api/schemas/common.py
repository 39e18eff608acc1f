"""Shapes shared by every resource: the error envelope, cursor-paginated lists, and the strict
scalar types every request schema uses.

Every string a client sends is `Text` (valid Unicode, no NUL: a lone surrogate such as "\\ud800"
cannot be stored or sent back, and Postgres refuses NUL), every integer `StrictInt` (no `true`, no
"3"), every float `StrictFloat` (no "0.1", no NaN or Infinity) and every flag `StrictBool`.
"""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, AllowInfNan, BaseModel, Field, Strict
from pydantic_core import PydanticCustomError

from qdpo_core.config import text_problem

T = TypeVar("T")


def _valid_text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise PydanticCustomError("invalid_text", "{problem}", {"problem": problem})
    return value


Text = Annotated[str, Strict(), AfterValidator(_valid_text)]
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict(), AllowInfNan(False)]
StrictBool = Annotated[bool, Strict()]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.", examples=["invalid_spec"])
    message: str = Field(
        description="What is wrong and how to fix it.", examples=["method.hyperparameters.beta: got 20; use a number in (0, 10], typically 0.05–0.5"]
    )
    param: str | None = Field(None, description="The request field at fault, as a dotted path.", examples=["method.hyperparameters.beta"])


class ErrorBody(BaseModel):
    error: ErrorDetail


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = Field(description="True when more items follow; pass `after=<next_cursor>` to get them.")
    next_cursor: str | None = Field(None, description="Id of the last item on this page when has_more is true.")


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


def error_responses(*codes: int) -> dict:
    """OpenAPI `responses=` entries for the error codes a route can answer with."""
    described = {
        401: "Missing or invalid API key.",
        404: "No such object for this tenant.",
        409: "The object's current state does not allow this.",
        413: "The request body (or upload) is larger than this deployment accepts.",
        422: "Invalid input; `param` names the field.",
        503: "A dependency (database, broker) is unavailable.",
    }
    return {code: {"model": ErrorBody, "description": described.get(code, "Error.")} for code in codes}
