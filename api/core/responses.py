"""A route's JSON answer, serialized in the route's own thread.

A sync route that returns a model has FastAPI validate it against the route's response_model in a
thread of the pool again, after the route returned: a second thread hop per request. Returning
`json_response(model)` instead sends exactly the bytes FastAPI would have sent (its own serializer:
the model's pydantic JSON, by alias, nothing left out), and the route's `response_model` still
documents the body.
"""

from __future__ import annotations

from pydantic import BaseModel
from starlette.responses import Response


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.__pydantic_serializer__.to_json(model, by_alias=True), status_code=status_code, media_type="application/json")
