"""Database tables (SQLAlchemy 2.0). Alembic migrations create them; nothing calls create_all.

Public ids (`job_…`, `file_…`) are random strings so they reveal nothing about other tenants;
an integer `pk` beside them gives a strict, portable order for cursor pagination. Event ids count
per job (`evt_1` is every job's first event): `Job.event_seq` is the last number handed out.
Times are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JSONType = JSON().with_variant(JSONB(), "postgresql")

# Job states; terminal ones never change again.
VALIDATING, QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED = ("validating", "queued", "running", "succeeded", "failed", "cancelling", "cancelled")
JOB_STATUSES = (VALIDATING, QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLING, CANCELLED)
TERMINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(100))
    key_prefix: Mapped[str] = mapped_column(String(20))  # shown in listings so keys can be told apart
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the whole key; the key itself is never stored
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class File(Base):
    __tablename__ = "files"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(20))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(500))  # relative to the artifact directory
    status: Mapped[str] = mapped_column(String(20), default="processed")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=VALIDATING)
    stage: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict] = mapped_column(JSONType)  # validated PipelineSpec.to_dict(), dataset paths left empty
    inputs: Mapped[dict] = mapped_column(JSONType, default=dict)  # {"prompts"|"pairs"|"eval_prompts": file id}
    request: Mapped[dict] = mapped_column(JSONType)  # the creation request as the API shows it back
    suffix: Mapped[str | None] = mapped_column(String(64))
    metadata_: Mapped[dict] = mapped_column("metadata", JSONType, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64))  # fingerprint of `request` (service.crud.jobs.request_fingerprint)

    progress: Mapped[dict | None] = mapped_column(JSONType)
    error: Mapped[dict | None] = mapped_column(JSONType)
    report: Mapped[dict | None] = mapped_column(JSONType)
    adapter_path: Mapped[str | None] = mapped_column(String(500))
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    adapter_bytes: Mapped[int | None] = mapped_column(BigInteger)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300))

    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    task_id: Mapped[str | None] = mapped_column(String(64))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # number of the job's last event

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (
        UniqueConstraint("job_pk", "seq", name="uq_job_events_job_seq"),
        UniqueConstraint("job_pk", "idempotency_key", name="uq_job_events_job_key"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.pk", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)  # 1, 2, … within the job; the public id is evt_<seq>
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    type: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(32))
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)
    step: Mapped[int | None] = mapped_column(Integer)
    total: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[dict] = mapped_column(JSONType, default=dict)
    # set by a writer that may write the same event twice (the worker's recorder): unique per job, never shown
    idempotency_key: Mapped[str | None] = mapped_column(String(64))


class JobMetric(Base):
    """One training step's metrics; a resumed run overwrites the steps it repeats."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_pk", "step", name="uq_job_metrics_job_step"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.pk", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    values: Mapped[dict] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobCheckpoint(Base):
    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_pk", "step", name="uq_job_checkpoints_job_step"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.pk", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str | None] = mapped_column(String(500))  # relative to the job's work directory
    metrics: Mapped[dict] = mapped_column(JSONType, default=dict)
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# Webhooks: a tenant's endpoints and the deliveries made to them (see service.crud.webhooks).
DELIVERY_PENDING, DELIVERY_SUCCEEDED, DELIVERY_FAILED = "pending", "succeeded", "failed"
DELIVERY_STATUSES = (DELIVERY_PENDING, DELIVERY_SUCCEEDED, DELIVERY_FAILED)


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)  # wh_…
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list] = mapped_column(JSONType, default=list)  # ["job.succeeded", …]
    description: Mapped[str | None] = mapped_column(String(200))
    secret: Mapped[str] = mapped_column(String(100))  # whsec_…: the service signs with it, so it is kept (shown to the tenant once)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """One event for one endpoint: written in the transaction that changed the job, sent by a dispatcher.

    `id` is the webhook-id every attempt carries (receivers dedupe on it). While a dispatcher sends
    it, `next_attempt_at` is pushed past the attempt's timeout: that is the claim, and a dispatcher
    that dies mid-send leaves it due again once that time has passed (at-least-once). A retry that
    would start later than the dispatcher's retry window after `created_at` is not made: the
    delivery has failed.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"), Index("ix_webhook_deliveries_endpoint", "endpoint_pk", "pk"))

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)  # msg_…
    endpoint_pk: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.pk", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(40))
    payload: Mapped[dict] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default=DELIVERY_PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempt_log: Mapped[list] = mapped_column(JSONType, default=list)  # [{at, status_code, error, duration_ms}], the latest last
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
