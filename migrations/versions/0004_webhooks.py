"""Webhooks: a tenant's endpoints and the deliveries made to them.

`webhook_deliveries` is an outbox: a row is written in the same transaction that changes a job's
status, and a dispatcher sends it later (retrying with back-off for a bounded time), so a job never
waits for a receiver and no committed status change goes unannounced.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("events", JSON, nullable=False),
        sa.Column("description", sa.String(200)),
        sa.Column("secret", sa.String(100), nullable=False),
        _when("created_at"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(40), nullable=False, unique=True),
        sa.Column("endpoint_pk", sa.Integer, sa.ForeignKey("webhook_endpoints.pk", ondelete="CASCADE"), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(40)),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("attempt_log", JSON, nullable=False),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("last_error", sa.String(500)),
        sa.Column("claimed_by", sa.String(200)),
        _when("next_attempt_at"),
        _when("created_at"),
        _when("delivered_at", nullable=True),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_webhook_deliveries_endpoint", "webhook_deliveries", ["endpoint_pk", "pk"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_endpoint", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
