"""Jobs keep a fingerprint of their creation request, so an Idempotency-Key reused with a
different body can be refused instead of silently answering with the first job.

The fingerprint is the sha256 of the canonical JSON of the validated request (keys sorted, no
spaces, ASCII escapes): exactly what `service.crud.jobs.request_fingerprint` computes. Existing
jobs created with a key get theirs from the request they stored.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _fingerprint(request: dict) -> str:
    # A copy of service.crud.jobs.request_fingerprint as of this revision: migrations do not import
    # code that may change after them.
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_sha256", sa.String(64), nullable=True))
    jobs = sa.table(
        "jobs", sa.column("pk", sa.Integer), sa.column("request", sa.JSON), sa.column("idempotency_key", sa.String), sa.column("request_sha256", sa.String)
    )
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs.c.pk, jobs.c.request).where(jobs.c.idempotency_key.is_not(None))).all()
    for pk, request in rows:
        if isinstance(request, str):  # a driver that hands JSON back as text
            request = json.loads(request)
        connection.execute(sa.update(jobs).where(jobs.c.pk == pk).values(request_sha256=_fingerprint(request or {})))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_sha256")
