"""Initial schema: tenants, API keys, files, jobs and their events, metrics and checkpoints.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        _when("created_at"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("name", sa.String(100)),
        sa.Column("key_prefix", sa.String(20), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        _when("created_at"),
        _when("revoked_at", nullable=True),
    )
    op.create_table(
        "files",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("purpose", sa.String(20), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        _when("created_at"),
    )
    op.create_table(
        "jobs",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(32)),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("inputs", JSON, nullable=False),
        sa.Column("request", JSON, nullable=False),
        sa.Column("suffix", sa.String(64)),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("progress", JSON),
        sa.Column("error", JSON),
        sa.Column("report", JSON),
        sa.Column("adapter_path", sa.String(500)),
        sa.Column("adapter_sha256", sa.String(64)),
        sa.Column("adapter_bytes", sa.BigInteger),
        sa.Column("fine_tuned_model", sa.String(300)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String(200)),
        _when("lease_expires_at", nullable=True),
        sa.Column("task_id", sa.String(64)),
        _when("enqueued_at", nullable=True),
        _when("created_at"),
        _when("updated_at"),
        _when("started_at", nullable=True),
        _when("finished_at", nullable=True),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant_id", "status"])
    op.create_index("ix_jobs_status_lease", "jobs", ["status", "lease_expires_at"])

    job_fk = lambda: sa.Column("job_pk", sa.Integer, sa.ForeignKey("jobs.pk", ondelete="CASCADE"), nullable=False)  # noqa: E731
    op.create_table(
        "job_events",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        job_fk(),
        _when("created_at"),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(32)),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("step", sa.Integer),
        sa.Column("total", sa.Integer),
        sa.Column("data", JSON, nullable=False),
    )
    op.create_index("ix_job_events_job_pk", "job_events", ["job_pk", "pk"])
    op.create_table(
        "job_metrics",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        job_fk(),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("total_steps", sa.Integer),
        sa.Column("values", JSON, nullable=False),
        _when("created_at"),
        sa.UniqueConstraint("job_pk", "step", name="uq_job_metrics_job_step"),
    )
    op.create_index("ix_job_metrics_job_pk", "job_metrics", ["job_pk"])
    op.create_table(
        "job_checkpoints",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        job_fk(),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("path", sa.String(500)),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("is_best", sa.Boolean, nullable=False),
        _when("created_at"),
        sa.UniqueConstraint("job_pk", "step", name="uq_job_checkpoints_job_step"),
    )
    op.create_index("ix_job_checkpoints_job_pk", "job_checkpoints", ["job_pk"])


def downgrade() -> None:
    for table in ("job_checkpoints", "job_metrics", "job_events", "jobs", "files", "api_keys", "tenants"):
        op.drop_table(table)
