"""From a stored job to a message in the broker: check inputs, mark queued, commit, then enqueue.

The order matters. The job is committed as `queued` before its id is sent, so a worker never
receives an id the database does not know; if sending fails (broker down, process killed), the
job simply stays queued and the reconciler sends it later.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.orm import Session

from service.broker import JobQueue
from service.crud import jobs as jobs_crud
from service.errors import ServiceError
from service.inputs import resolve_inputs
from service.storage import ArtifactStore
from service.tables import FAILED, VALIDATING, Job

log = logging.getLogger(__name__)


def input_problem(session: Session, store: ArtifactStore, job: Job) -> dict | None:
    """An error dict when an input file is gone or changed on disk since it was validated."""
    try:
        resolve_inputs(session, store, tenant_id=job.tenant_id, inputs=job.inputs or {}, verify_content=True)
    except ServiceError as exc:
        return exc.to_dict()
    return None


def validate_and_queue(session: Session, *, store: ArtifactStore, queue: JobQueue, job: Job) -> None:
    """validating → queued (then enqueue) or → failed when an input file no longer checks out."""
    problem = input_problem(session, store, job)
    if problem is not None:
        jobs_crud.finish(session, job_pk=job.pk, owner=None, status=FAILED, accept=(VALIDATING,), message=problem["message"], level="error", error=problem)
    elif jobs_crud.mark_queued(session, job_pk=job.pk, message="queued") and enqueue(session, queue=queue, job=job, refresh=True):
        return  # reloaded as it was recorded enqueued
    session.refresh(job)


def create_and_queue(session: Session, *, queue: JobQueue, job: Job) -> None:
    """A job without input files: stored as queued (with its task id) in one transaction, then sent.

    The same order as validate_and_queue — committed before its id is sent — in fewer statements: it
    is never `validating`, since there is nothing to check. If sending fails, the job is recorded as
    never sent and the reconciler sends it later.
    """
    task_id = str(uuid.uuid4())
    jobs_crud.create_queued_job(session, job=job, task_id=task_id, messages=("job created", "queued"))
    try:
        queue.enqueue(job.id, task_id=task_id)
    except Exception as exc:
        jobs_crud.mark_unsent(session, job_pk=job.pk)
        _broker_failed(session, job, exc)
        session.refresh(job)


def enqueue(session: Session, *, queue: JobQueue, job: Job, reason: str | None = None, refresh: bool = False) -> bool:
    """Send the job's id to the broker (after its state was committed). False if the broker failed.

    `refresh`: once sent, `job` is reloaded in the transaction that records it sent.
    """
    try:
        task_id = queue.enqueue(job.id)
    except Exception as exc:
        _broker_failed(session, job, exc)
        return False
    jobs_crud.mark_enqueued(session, job_pk=job.pk, task_id=task_id, refresh=job if refresh and not reason else None)
    if reason:
        jobs_crud.add_status_event(session, job_pk=job.pk, message=reason)
        if refresh:
            session.refresh(job)
        session.commit()
    return True


def _broker_failed(session: Session, job: Job, exc: Exception) -> None:
    """Record (and commit) that the job's message could not be sent: it stays queued for the reconciler."""
    log.warning("could not enqueue %s: %s", job.id, exc)
    jobs_crud.add_status_event(
        session,
        job_pk=job.pk,
        level="warning",
        message=f"the broker is unreachable ({type(exc).__name__}); the job stays queued and is sent again when it is back",
    )
    session.commit()


def withdraw(queue: JobQueue, job: Job) -> None:
    """Take back the broker messages of a job that will never run (cancelled while queued, or deleted).

    Best effort: a message left behind is still harmless (its claim fails), it only costs the
    embedded broker's worker a poll.
    """
    try:
        removed = queue.discard(job.id, job.task_id)
    except Exception as exc:
        log.warning("could not withdraw the messages of %s: %s", job.id, exc)
        return
    if removed:
        log.info("withdrew %d message(s) of %s from the broker", removed, job.id)
