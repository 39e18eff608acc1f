"""Event ids count per job (evt_1, evt_2, … for every job) instead of one global sequence, which
told a tenant how busy everyone else was.

`jobs.event_seq` is the number of the job's last event, incremented atomically by the one function
that adds events (service.crud.events.add_event); `job_events.seq` is unique per job. Existing
events are numbered in the order they were written (by pk) within their job, so old jobs read as
if they had always been numbered this way; a cursor saved before the upgrade no longer applies.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("seq", sa.Integer, nullable=True))
    # UPDATE … FROM with a window function: PostgreSQL, and SQLite since 3.33.
    op.execute(
        "UPDATE job_events SET seq = numbered.n FROM "
        "(SELECT pk, ROW_NUMBER() OVER (PARTITION BY job_pk ORDER BY pk) AS n FROM job_events) AS numbered "
        "WHERE numbered.pk = job_events.pk"
    )
    op.execute("UPDATE jobs SET event_seq = COALESCE((SELECT MAX(job_events.seq) FROM job_events WHERE job_events.job_pk = jobs.pk), 0)")
    with op.batch_alter_table("job_events") as batch:
        batch.alter_column("seq", existing_type=sa.Integer, nullable=False)
        batch.drop_index("ix_job_events_job_pk")
        batch.create_unique_constraint("uq_job_events_job_seq", ["job_pk", "seq"])


def downgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.drop_constraint("uq_job_events_job_seq", type_="unique")
        batch.create_index("ix_job_events_job_pk", ["job_pk", "pk"])
        batch.drop_column("seq")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("event_seq")
