"""A job's event log, training metrics and checkpoints."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.orm import Session

from service.errors import InvalidInput
from service.tables import Job, JobCheckpoint, JobEvent, JobMetric

EVENT_PREFIX = "evt_"
MAX_EVENT_NUMBER = 2**31 - 1  # the column is a 32-bit integer on every database
_EVENT_ID = re.compile(r"evt_([0-9]{1,10})")  # ASCII digits only: str.isdigit() would take '²'


def event_public_id(seq: int) -> str:
    return f"{EVENT_PREFIX}{seq}"


def parse_event_cursor(after: str | None, param: str = "after") -> int:
    """The event number in `evt_<n>`, or 0 for no cursor; InvalidInput naming `param` otherwise."""
    if after is None:
        return 0
    match = _EVENT_ID.fullmatch(after)
    if match is None or int(match.group(1)) > MAX_EVENT_NUMBER:
        shown = after if len(after) <= 40 else after[:40] + "…"
        raise InvalidInput(
            f"{param}: {shown!r} is not an event id (they look like 'evt_123'; use one this job's events returned)", param, code="invalid_cursor"
        )
    return int(match.group(1))


def storable(value: Any) -> Any:
    """Text as every database stores it: NUL becomes U+FFFD, a lone surrogate its escape (at any depth).

    Event messages and data can quote what a model or a remote endpoint said; that must not make the
    write fail (Postgres refuses NUL, no encoder takes a lone surrogate).
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


# Built once (every event takes a number): building a statement and its cache key costs more than running it.
_NEXT_SEQ = (
    update(Job)
    .where(Job.pk == bindparam("pk_"))
    .values(event_seq=Job.event_seq + 1, updated_at=Job.updated_at)  # an event is not a change of the job's state
    .returning(Job.event_seq)
    .execution_options(synchronize_session=False)
)


def add_event(
    session: Session,
    *,
    job_pk: int,
    type: str,
    stage: str | None,
    message: str,
    level: str = "info",
    step: int | None = None,
    total: int | None = None,
    data: dict | None = None,
    key: str | None = None,
    created_at: datetime | None = None,
) -> int | None:
    """Add one event to the job's log, in the caller's transaction; returns its number (None: no such job).

    The only way events are written (lifecycle events from service.crud.jobs, pipeline events from
    the worker's recorder). The number comes from the job row's counter, incremented by one UPDATE,
    so concurrent writers get distinct, gap-free numbers and the row lock orders them.

    `key` makes the write idempotent: an event with the same key already in the job's log is not
    added again (its number is returned), so a writer that cannot tell whether its commit landed
    (the database went away meanwhile) can simply write again. `created_at` is when it happened,
    for an event written later than that (from the worker's spool).
    """
    if key is not None and (existing := seq_of_key(session, job_pk=job_pk, key=key)) is not None:
        return existing
    seq = session.execute(_NEXT_SEQ, {"pk_": job_pk}).scalar()
    if seq is None:  # deleted meanwhile
        return None
    event = JobEvent(job_pk=job_pk, seq=seq, type=type, stage=stage, level=level, message=storable(message), step=step, total=total, data=storable(data or {}))
    if key is not None:
        event.idempotency_key = key
    if created_at is not None:
        event.created_at = created_at
    session.add(event)
    return seq


def seq_of_key(session: Session, *, job_pk: int, key: str) -> int | None:
    """The number of the job's event written with this idempotency key, if there is one."""
    return session.scalar(select(JobEvent.seq).where(JobEvent.job_pk == job_pk, JobEvent.idempotency_key == key))


def list_events(session: Session, *, job_pk: int, after_seq: int, limit: int, types: Sequence[str] | None = None) -> tuple[list[JobEvent], bool]:
    """Oldest first, so a client can follow a job by passing the last id it saw."""
    query = select(JobEvent).where(JobEvent.job_pk == job_pk, JobEvent.seq > after_seq)
    if types:
        query = query.where(JobEvent.type.in_(types))
    rows = list(session.scalars(query.order_by(JobEvent.seq).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def upsert_metric(session: Session, *, job_pk: int, step: int, total_steps: int | None, values: dict) -> None:
    # A resumed run repeats the steps after its last checkpoint: the new values replace the old.
    session.execute(delete(JobMetric).where(JobMetric.job_pk == job_pk, JobMetric.step == step))
    session.add(JobMetric(job_pk=job_pk, step=step, total_steps=total_steps, values=values))


def list_metrics(session: Session, *, job_pk: int) -> list[JobMetric]:
    return list(session.scalars(select(JobMetric).where(JobMetric.job_pk == job_pk).order_by(JobMetric.step)))


def upsert_checkpoint(session: Session, *, job_pk: int, step: int, path: str | None, metrics: dict, is_best: bool) -> None:
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_pk == job_pk, JobCheckpoint.step == step))
    session.add(JobCheckpoint(job_pk=job_pk, step=step, path=path, metrics=metrics, is_best=is_best))


def mark_selected_checkpoint(session: Session, *, job_pk: int, step: int | None) -> None:
    """After the run, exactly the checkpoint the export used is the best one."""
    for checkpoint in session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_pk == job_pk)):
        checkpoint.is_best = step is not None and checkpoint.step == step


def list_checkpoints(session: Session, *, job_pk: int) -> list[JobCheckpoint]:
    return list(session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_pk == job_pk).order_by(JobCheckpoint.step)))
