"""Base models a deployment offers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ModelPublic(BaseModel):
    id: str = Field(examples=["smollm2-135m-instruct"])
    object: Literal["model"] = "model"
    description: str = ""
    quantizations: dict[str, dict[str, Any]] = Field(description="Quantization methods and the bit widths each supports.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]
