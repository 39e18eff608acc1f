"""Webhook endpoints: what a tenant registers, and the deliveries made to them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from api.schemas.common import Text
from service.crud.webhooks import DEFAULT_EVENTS, EVENT_TYPES
from service.tables import DELIVERY_STATUSES

WebhookEventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]
DeliveryStatus = Literal[DELIVERY_STATUSES]  # type: ignore[valid-type]


class WebhookCreate(BaseModel):
    """An endpoint to POST job events to, signed the Standard Webhooks way."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"url": "https://example.com/hooks/qdpo", "events": ["job.succeeded", "job.failed"], "description": "CI notifier"}]},
    )

    url: Annotated[Text, StringConstraints(max_length=2048)] = Field(
        description="http(s) URL on a public address (the operator may allow internal networks); redirects are not followed."
    )
    events: list[WebhookEventType] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        max_length=len(EVENT_TYPES),
        description=f"Job status changes to send, each once: {', '.join(EVENT_TYPES)}. Default: {', '.join(DEFAULT_EVENTS)}.",
    )
    description: Annotated[Text, StringConstraints(max_length=200)] | None = Field(None, description="A label for you (up to 200 characters).")

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted({event for event in value if value.count(event) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} given more than once; list each event once")
        return value


class WebhookPublic(BaseModel):
    id: str = Field(examples=["wh_5c1d0e9f8a7b6c5d4e3f2a1b"])
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str | None = None
    created_at: int


class WebhookCreated(WebhookPublic):
    secret: str = Field(
        description="The signing secret (whsec_…), shown only in this answer: verify each delivery's webhook-signature with it.",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class DeliveryAttempt(BaseModel):
    attempt: int
    at: float = Field(description="When the attempt started (Unix time).")
    status_code: int | None = Field(None, description="The receiver's HTTP status; none when it did not answer.")
    error: str | None = Field(None, description="Why the attempt did not count as delivered (timeout, connection refused, HTTP 500: …).")
    duration_ms: int


class DeliveryPublic(BaseModel):
    id: str = Field(description="The webhook-id every attempt of this delivery carried (dedupe on it).", examples=["msg_2b7e151628aed2a6abf71588"])
    object: Literal["webhook.delivery"] = "webhook.delivery"
    webhook_id: str
    event_type: str = Field(examples=["job.succeeded"])
    job_id: str | None = None
    status: DeliveryStatus = Field(description="pending (being retried), succeeded (a 2xx answer) or failed (given up).")
    attempts: int
    last_status_code: int | None = None
    last_error: str | None = None
    next_attempt_at: int | None = Field(None, description="When the next attempt is due, while pending.")
    created_at: int
    delivered_at: int | None = None
    attempt_log: list[DeliveryAttempt] = Field(default_factory=list, description="Every attempt, oldest first (the latest 50).")
    payload: dict[str, Any] = Field(description="The body sent: {type, timestamp, data: the job}.")
