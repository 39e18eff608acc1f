"""Job events carry an optional idempotency key, unique per job.

The worker's recorder gives every pipeline event a key when it is first reported and writes it
with that key, from its spool if the database was unreachable at the time; an event whose commit
landed although the writer never heard back is then not added a second time. Lifecycle events
need no key (NULLs never collide).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(64), nullable=True))
        batch.create_unique_constraint("uq_job_events_job_key", ["job_pk", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.drop_constraint("uq_job_events_job_key", type_="unique")
        batch.drop_column("idempotency_key")
