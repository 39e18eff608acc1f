"""Typed views of the API's responses. Unknown fields are kept, so a newer server does not break them."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")
TERMINAL = ("succeeded", "failed", "cancelled")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class File(_Model):
    id: str
    purpose: str
    filename: str
    bytes: int
    rows: int
    sha256: str
    status: str
    created_at: int


class Progress(_Model):
    stage: str | None = None
    stage_index: int | None = None
    stage_count: int | None = None
    step: int | None = None
    total_steps: int | None = None
    eta_seconds: float | None = None


class Adapter(_Model):
    bytes: int
    sha256: str
    url: str


class Job(_Model):
    id: str
    status: str
    stage: str | None = None
    model: str
    quantization: dict[str, Any] = {}
    dataset: dict[str, Any] = {}
    method: dict[str, Any] = {}
    seed: int | None = None
    suffix: str | None = None
    metadata: dict[str, str] = {}
    progress: Progress | None = None
    error: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    adapter: Adapter | None = None
    attempts: int = 0
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class Event(_Model):
    id: str
    created_at: float
    type: str
    stage: str | None = None
    level: str = "info"
    message: str
    step: int | None = None
    total: int | None = None
    data: dict[str, Any] = {}


class Metric(_Model):
    step: int
    total_steps: int | None = None
    values: dict[str, Any]


class Checkpoint(_Model):
    step: int
    metrics: dict[str, Any]
    is_best: bool
    created_at: int


class Model(_Model):
    id: str
    description: str = ""
    quantizations: dict[str, Any] = {}


class Page(_Model, Generic[T]):
    data: list[T]
    has_more: bool = False
    next_cursor: str | None = None


class WebhookEndpoint(_Model):
    id: str
    url: str
    events: list[str] = []
    description: str | None = None
    created_at: int
    secret: str | None = None  # only in the answer to webhooks.create


class WebhookDelivery(_Model):
    id: str  # the webhook-id every attempt carried
    webhook_id: str
    event_type: str
    job_id: str | None = None
    status: str  # pending | succeeded | failed
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: int | None = None
    created_at: int
    delivered_at: int | None = None
    attempt_log: list[dict[str, Any]] = []
    payload: dict[str, Any] = {}
