"""Uploaded dataset files."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FilePurpose = Literal["prompts", "preferences", "references"]


class FilePublic(BaseModel):
    id: str = Field(examples=["file_8f2c1e0a9b7d6c5e4f3a2b1c"])
    object: Literal["file"] = "file"
    purpose: FilePurpose
    filename: str = Field(examples=["prompts.jsonl"])
    bytes: int = Field(examples=[20480])
    rows: int = Field(description="Records in the file (blank lines not counted).", examples=[200])
    sha256: str
    status: Literal["processed"] = Field("processed", description="Files are validated before they are stored, so a stored file is always processed.")
    created_at: int = Field(description="Unix time, seconds.", examples=[1763765000])


class LineError(BaseModel):
    line: int
    field: str | None
    message: str
