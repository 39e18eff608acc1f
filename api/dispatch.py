"""From a stored job to a message in the broker: check inputs, mark queued, commit, then enqueue.

The order matters. The job is committed as `queued` before its id is sent, so a worker never
receives an id the database does not know; if sending fails (broker down, process killed), the
job simply stays queued and the reconciler sends it later.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.crud import jobs as jobs_crud
from api.jobspec import INPUT_FILES
from api.models import FAILED, VALIDATING, File, Job
from api.queue import JobQueue
from api.storage import ArtifactStore, sha256_of

log = logging.getLogger(__name__)


def input_problem(session: Session, store: ArtifactStore, job: Job) -> dict | None:
    """An error dict when an input file is gone or changed on disk since it was validated."""
    for field, file_id in (job.inputs or {}).items():
        record = session.scalar(select(File).where(File.id == file_id, File.tenant_id == job.tenant_id))
        param = INPUT_FILES[field].param
        if record is None:
            return {"code": "file_not_found", "message": f"{param}: file {file_id} was deleted before the job started", "param": param}
        path = store.absolute(record.path)
        if not path.is_file() or sha256_of(path) != record.sha256:
            return {"code": "file_corrupted", "message": f"{param}: the stored copy of {file_id} is missing or changed; upload the file again", "param": param}
    return None


def validate_and_queue(session: Session, *, store: ArtifactStore, queue: JobQueue, job: Job) -> None:
    """validating → queued (then enqueue) or → failed when an input file no longer checks out."""
    problem = input_problem(session, store, job)
    if problem is not None:
        jobs_crud.finish(session, job_pk=job.pk, owner=None, status=FAILED, accept=(VALIDATING,), message=problem["message"], level="error", error=problem)
    elif jobs_crud.mark_queued(session, job_pk=job.pk, message="queued"):
        enqueue(session, queue=queue, job=job)
    session.refresh(job)


def enqueue(session: Session, *, queue: JobQueue, job: Job, reason: str | None = None) -> bool:
    """Send the job's id to the broker (after its state was committed). False if the broker failed."""
    try:
        task_id = queue.enqueue(job.id)
    except Exception as exc:
        log.warning("could not enqueue %s: %s", job.id, exc)
        jobs_crud.add_status_event(session, job_pk=job.pk, level="warning", message=f"the broker is unreachable ({type(exc).__name__}); the job stays queued and is sent again when it is back")
        session.commit()
        return False
    jobs_crud.mark_enqueued(session, job_pk=job.pk, task_id=task_id)
    if reason:
        jobs_crud.add_status_event(session, job_pk=job.pk, message=reason)
        session.commit()
    return True
