"""Jobs and their state machine. Every transition is one compare-and-set UPDATE.

    validating ─► queued ─► running ─► succeeded | failed
        │            │         │  └──► cancelling ─► cancelled
        └────────────┴─────────┴─────────────────────► cancelled / failed

(a job without input files is created `queued`: create_queued_job)

A transition names the states it accepts (and, for a worker, the lease it holds), so two actors
racing on one job — a worker and a cancel request, two workers after a redelivery, a worker and
the reconciler — can never both win: the loser's UPDATE matches no row. A transition that wins
also writes the tenant's webhook deliveries for it (service.crud.webhooks), in its transaction.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from functools import cache
from typing import Any, cast

from sqlalchemy import CursorResult, Row, Select, Update, bindparam, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ClauseElement

from service.crud import events as events_crud
from service.crud import webhooks as webhooks_crud
from service.crud.pagination import cursor_pk, split_page
from service.errors import InvalidInput
from service.security import looks_like_id
from service.tables import CANCELLED, CANCELLING, QUEUED, RUNNING, TERMINAL_STATUSES, VALIDATING, Job, JobEvent, utcnow

LIVE_STATUSES = (RUNNING, CANCELLING)


def add_status_event(session: Session, *, job_pk: int, message: str, level: str = "info", **data) -> None:
    """A lifecycle event (type "status"), written in the caller's transaction."""
    events_crud.add_event(session, job_pk=job_pk, type="status", stage=None, level=level, message=message, data=data)


def create_job(session: Session, *, job: Job, commit: bool = True) -> Job:
    """Insert the job (validating) and its first event; `commit=False` leaves them to the caller's next commit."""
    session.add(job)
    session.flush()
    add_status_event(session, job_pk=job.pk, message="job created; checking its input files")
    if commit:
        session.commit()
    return job


def create_queued_job(session: Session, *, job: Job, task_id: str, messages: tuple[str, ...]) -> Job:
    """Insert a job that has nothing to validate (no input files) straight as `queued`, recorded as sent
    with `task_id`, and its first events; committed, so the caller sends the message next.

    The job is new, so nobody else can write its events yet: they are numbered here (no counter
    UPDATE per event) and inserted in one statement. Sending comes after the commit, as for every job;
    if it fails, `unsent` takes the record back (service.dispatch).
    """
    job.status, job.task_id, job.enqueued_at, job.event_seq = QUEUED, task_id, utcnow(), len(messages)
    session.add(job)
    session.flush()
    session.add_all(
        JobEvent(job_pk=job.pk, seq=seq, type="status", stage=None, level="info", message=message, data={}) for seq, message in enumerate(messages, 1)
    )
    webhooks_crud.job_status_changed(session, job_pk=job.pk, status=QUEUED)
    session.commit()
    return job


def find_by_idempotency_key(session: Session, *, tenant_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def request_fingerprint(request: dict) -> str:
    """sha256 of the canonical JSON of a validated creation request (keys sorted, no spaces, ASCII)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")).hexdigest()


def request_differences(first: dict, second: dict, prefix: str = "") -> list[str]:
    """Dotted paths at which two requests differ (a field given in only one of them counts)."""
    paths = []
    for key in sorted(set(first) | set(second)):
        a, b, path = first.get(key), second.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            paths += request_differences(a, b, path + ".")
        elif a != b or type(a) is not type(b):
            paths.append(path)
    return paths


def check_idempotent_reuse(earlier: Job, *, key: str, request: dict) -> None:
    """The same Idempotency-Key must come with the same request, or it is refused (as payment APIs do)."""
    if earlier.request_sha256 == request_fingerprint(request):
        return
    differences = request_differences(earlier.request or {}, request)
    shown = ", ".join(differences[:5]) + (f" and {len(differences) - 5} more" if len(differences) > 5 else "")
    raise InvalidInput(
        f"Idempotency-Key: {key[:80]!r} was first used to create job {earlier.id} with a different request (it differs in {shown or 'its body'}); "
        "resend exactly the first request to get that job back, or use a new key for a new job",
        "Idempotency-Key",
        code="idempotency_key_reused",
        job_id=earlier.id,
    )


# What the API shows of a job (api.jobspec.job_public): reading a job to answer with it loads only
# these, not the report, the creation request or the lease bookkeeping; read as plain rows whose
# attribute names are a Job's (labelled: metadata_ is the column "metadata").
_SHOWN_ROW = tuple(
    column.label(column.key)
    for column in (
        Job.id,
        Job.status,
        Job.stage,
        Job.model,
        Job.spec,
        Job.inputs,
        Job.suffix,
        Job.metadata_,
        Job.progress,
        Job.error,
        Job.fine_tuned_model,
        Job.adapter_sha256,
        Job.adapter_bytes,
        Job.attempts,
        Job.cancel_requested,
        Job.created_at,
        Job.started_at,
        Job.finished_at,
    )
)

# The lookups of every request, built once: building a statement and its cache key costs more
# than executing the cached compiled form (about 0.3 ms of CPU a query).
_JOB_OF_TENANT = select(Job).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
# A job read only to be shown, as a plain row (no ORM object, identity map or attribute state):
# the lookup of every GET /v1/jobs/{id}.
_SHOWN_JOB_OF_TENANT = select(*_SHOWN_ROW).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))
_JOB_BY_ID = select(Job).where(Job.id == bindparam("job_id"))


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job | None:
    if not looks_like_id(job_id, "job"):
        return None
    return session.scalar(_JOB_OF_TENANT, {"job_id": job_id, "tenant_id": tenant_id})


def shown_job_query(*, tenant_id: str, job_id: str) -> tuple[Select, dict] | None:
    """The statement and parameters whose first row has the shown columns of a tenant's job, with
    the same attribute names as a Job (for reading only); None for an id that names no job."""
    if not looks_like_id(job_id, "job"):
        return None
    return _SHOWN_JOB_OF_TENANT, {"job_id": job_id, "tenant_id": tenant_id}


def get_job_by_id(session: Session, *, job_id: str) -> Job | None:
    """For workers and the reconciler, which act on behalf of the job's own tenant."""
    if not looks_like_id(job_id, "job"):
        return None
    return session.scalar(_JOB_BY_ID, {"job_id": job_id})


def _jobs_page(by_status: bool, after_cursor: bool) -> Select:
    query = select(*_SHOWN_ROW).where(Job.tenant_id == bindparam("tenant_id"))
    if by_status:
        query = query.where(Job.status == bindparam("status"))
    if after_cursor:
        query = query.where(Job.pk < bindparam("cursor_pk"))
    return query.order_by(Job.pk.desc()).limit(bindparam("limit_"))


# A page of a tenant's jobs, newest first (service.crud.pagination), with or without a status and a cursor.
_JOB_PAGES = {(by_status, after_cursor): _jobs_page(by_status, after_cursor) for by_status in (False, True) for after_cursor in (False, True)}


def list_jobs(session: Session, *, tenant_id: str, status: str | None, after: str | None, limit: int) -> tuple[list[Row], bool]:
    """A page of the tenant's jobs as the API shows them: rows of the shown columns, as shown_job_query's."""
    pk = cursor_pk(session, model=Job, after=after, tenant_id=tenant_id) if after is not None else None
    return split_page(session.connection().execute(*jobs_page_query(tenant_id=tenant_id, status=status, cursor_pk=pk, limit=limit)), limit)


def jobs_page_query(*, tenant_id: str, status: str | None, cursor_pk: int | None, limit: int) -> tuple[Select, dict]:
    """The statement and parameters of list_jobs' page (limit + 1 rows: split_page tells whether there are more)
    after the job of `cursor_pk` (service.crud.pagination.cursor_query finds it)."""
    params: dict[str, Any] = {"tenant_id": tenant_id, "status": status, "limit_": limit + 1, "cursor_pk": cursor_pk}
    return _JOB_PAGES[bool(status), cursor_pk is not None], params


def _cas_where(with_owner: bool) -> Update:
    """The compare-and-set UPDATE's condition: this job, in one of the accepted states (and leased to the owner)."""
    statement = update(Job).where(Job.pk == bindparam("cas_pk"), Job.status.in_(bindparam("cas_accept", expanding=True)))
    if with_owner:
        statement = statement.where(Job.lease_owner == bindparam("cas_owner"))
    return statement.execution_options(synchronize_session=False)


@cache
def _cas_statement(with_owner: bool, columns: tuple[str, ...]) -> Update:
    """The compare-and-set UPDATE of these columns, built once per shape (its values are parameters too)."""
    return _cas_where(with_owner).values({name: bindparam(f"cas_{name}") for name in columns})


def _cas(session: Session, job_pk: int, accept: tuple[str, ...], owner: str | None = None, **values) -> bool:
    values["updated_at"] = utcnow()
    params: dict[str, Any] = {"cas_pk": job_pk, "cas_accept": list(accept), "cas_owner": owner}
    if any(isinstance(value, ClauseElement) for value in values.values()):  # an SQL expression is part of the statement
        statement = _cas_where(owner is not None).values(**values)
    else:
        # building the statement and its cache key cost more CPU than running it (about 0.1 ms)
        statement = _cas_statement(owner is not None, tuple(sorted(values)))
        params.update({f"cas_{name}": value for name, value in values.items()})
    # an UPDATE answers with a CursorResult (Session.execute is typed as returning any Result)
    result = cast(CursorResult[Any], session.execute(statement, params))
    changed = result.rowcount == 1
    if changed and "status" in values:  # announced to the tenant's webhooks in this same transaction
        webhooks_crud.job_status_changed(session, job_pk=job_pk, status=values["status"])
    return changed


def mark_queued(session: Session, *, job_pk: int, accept: tuple[str, ...] = (VALIDATING,), message: str = "queued", level: str = "info") -> bool:
    """Move to queued (clearing any lease) and record why; the caller enqueues after commit."""
    moved = _cas(session, job_pk, accept, status=QUEUED, lease_owner=None, lease_expires_at=None)
    if moved:
        add_status_event(session, job_pk=job_pk, message=message, level=level)
    session.commit()
    return moved


_MARK_ENQUEUED = (
    update(Job)
    .where(Job.pk == bindparam("pk_"))
    .values(task_id=bindparam("task_id_"), enqueued_at=bindparam("at_"))
    .execution_options(synchronize_session=False)
)
# The same UPDATE answering with the whole row, which overwrites the session's copy of the job.
_MARK_ENQUEUED_RETURNING = _MARK_ENQUEUED.returning(Job).execution_options(populate_existing=True)


def mark_enqueued(session: Session, *, job_pk: int, task_id: str, refresh: Job | None = None) -> None:
    """Record the broker's task id; `refresh` is reloaded from the row the UPDATE returns (no SELECT, no second transaction)."""
    params = {"pk_": job_pk, "task_id_": task_id, "at_": utcnow()}
    if refresh is not None and session.scalars(_MARK_ENQUEUED_RETURNING, params).one_or_none() is None:
        session.refresh(refresh)  # deleted meanwhile: as before, the refresh says so
    elif refresh is None:
        session.execute(_MARK_ENQUEUED, params)
    session.commit()


def mark_unsent(session: Session, *, job_pk: int) -> None:
    """The message recorded as sent was not: the job waits as never sent, and the reconciler sends it."""
    session.execute(_MARK_ENQUEUED, {"pk_": job_pk, "task_id_": None, "at_": None})


def request_cancel(session: Session, *, job: Job) -> str:
    """Cancel now if nothing runs yet, else flag it for the worker. Returns the resulting status."""
    if _cas(session, job.pk, (VALIDATING, QUEUED), status=CANCELLED, cancel_requested=True, finished_at=utcnow()):
        add_status_event(session, job_pk=job.pk, message="cancelled before it started")
    elif _cas(session, job.pk, (RUNNING,), status=CANCELLING, cancel_requested=True):
        add_status_event(session, job_pk=job.pk, message="cancel requested; the worker stops at the next step")
    session.commit()
    session.refresh(job)
    return job.status


def delete_job(session: Session, *, job: Job) -> None:
    session.delete(job)
    session.commit()


# --- worker side -------------------------------------------------------------------------------


def claim(session: Session, *, job_id: str, owner: str, lease_seconds: float, task_id: str | None) -> Job | None:
    """queued → running under a lease held by `owner`; also takes over a running job whose lease ran out."""
    now = utcnow()
    job = get_job_by_id(session, job_id=job_id)
    if job is None:
        return None
    statement = (
        update(Job)
        .where(Job.pk == job.pk)
        .where((Job.status == QUEUED) | ((Job.status == RUNNING) & (Job.lease_expires_at < now)))
        .values(
            status=RUNNING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Job.attempts + 1,
            task_id=task_id,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if cast(CursorResult[Any], session.execute(statement)).rowcount != 1:
        session.rollback()
        return None
    webhooks_crud.job_status_changed(session, job_pk=job.pk, status=RUNNING)
    session.execute(update(Job).where(Job.pk == job.pk, Job.started_at.is_(None)).values(started_at=now).execution_options(synchronize_session=False))
    session.commit()
    session.refresh(job)
    add_status_event(session, job_pk=job.pk, message=f"running (attempt {job.attempts})", worker=owner)
    session.commit()
    return job


def renew_lease(session: Session, *, job_pk: int, owner: str, lease_seconds: float) -> bool:
    renewed = _cas(session, job_pk, LIVE_STATUSES, owner=owner, lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    session.commit()
    return renewed


def cancel_state(session: Session, *, job_pk: int, owner: str) -> tuple[bool, bool]:
    """(cancel requested, lease still ours) for the running job."""
    row = session.execute(select(Job.cancel_requested, Job.lease_owner).where(Job.pk == job_pk)).one_or_none()
    session.rollback()  # read-only; do not hold a snapshot open between polls
    if row is None:
        return True, False  # deleted under us
    return bool(row.cancel_requested), row.lease_owner == owner


def finish(
    session: Session, *, job_pk: int, owner: str | None, status: str, message: str, level: str = "info", accept: tuple[str, ...] = LIVE_STATUSES, **values
) -> bool:
    """Enter a terminal state (only if the lease is still `owner`'s, when given)."""
    assert status in TERMINAL_STATUSES
    values = {key: events_crud.storable(value) if key in ("error", "report") else value for key, value in values.items()}  # may quote remote text
    done = _cas(session, job_pk, accept, owner=owner, status=status, finished_at=utcnow(), lease_owner=None, lease_expires_at=None, **values)
    if done:
        add_status_event(session, job_pk=job_pk, message=message, level=level)
    session.commit()
    return done


def release(session: Session, *, job_pk: int, owner: str, message: str) -> bool:
    """running → queued by the worker itself (to retry after an internal error)."""
    # enqueued_at = now: the retry message is on its way, so the reconciler leaves the job alone for a while.
    moved = _cas(session, job_pk, (RUNNING,), owner=owner, status=QUEUED, lease_owner=None, lease_expires_at=None, enqueued_at=utcnow())
    if moved:
        add_status_event(session, job_pk=job_pk, message=message, level="warning")
    session.commit()
    return moved


def update_progress(session: Session, *, job_pk: int, owner: str, stage: str | None, progress: dict | None) -> None:
    values: dict = {"progress": progress}
    if stage is not None:
        values["stage"] = stage
    _cas(session, job_pk, LIVE_STATUSES, owner=owner, **values)
    session.commit()


# --- reconciler side ---------------------------------------------------------------------------


def expired_leases(session: Session, *, now: datetime) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.status.in_(LIVE_STATUSES), Job.lease_expires_at < now)))


def stale_validating(session: Session, *, before: datetime) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.status == VALIDATING, Job.created_at < before)))


def waiting_since(session: Session, *, before: datetime) -> list[Job]:
    """Queued jobs last handed to the broker before `before` (or never, and queued before it)."""
    never_sent = Job.enqueued_at.is_(None) & (Job.updated_at < before)
    query = select(Job).where(Job.status == QUEUED, (Job.enqueued_at < before) | never_sent)
    return list(session.scalars(query.order_by(Job.pk)))
