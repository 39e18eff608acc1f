"""The reconciler: puts jobs back on track when a message or a worker was lost.

Three repairs, each a compare-and-set so any number of reconcilers (one per API process, or a
cron `qdpo reconcile`) can run at once without doing anything twice:

1. A running job whose lease expired (its worker died or froze) goes back to `queued` and is
   enqueued again; the next worker resumes it from its last finished stage / checkpoint.
   A job that has used up its attempts fails instead; one that was being cancelled is cancelled.
2. A job left in `validating` (the API died mid-request) is checked and queued.
3. A queued job whose message is missing from the broker is enqueued again. Waiting in a long
   queue is normal, so it only acts when the broker holds fewer messages than there are jobs
   waiting; a duplicate message is harmless because only one claim can win.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from service.broker import JobQueue
from service.config import Settings
from service.crud import jobs as jobs_crud
from service.db import session_factory
from service.dispatch import enqueue, validate_and_queue
from service.storage import ArtifactStore
from service.tables import CANCELLED, FAILED, RUNNING, utcnow

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    requeued_expired: list[str] = field(default_factory=list)
    failed_expired: list[str] = field(default_factory=list)
    cancelled_expired: list[str] = field(default_factory=list)
    queued_validating: list[str] = field(default_factory=list)
    reenqueued_lost: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in self.__dataclass_fields__)


def reconcile_once(settings: Settings, queue: JobQueue, *, requeue_after_seconds: float | None = None) -> ReconcileReport:
    report = ReconcileReport()
    store = ArtifactStore(settings.resolved_artifact_dir)
    wait = settings.requeue_after_seconds if requeue_after_seconds is None else requeue_after_seconds
    with session_factory(settings.resolved_database_url)() as session:
        now = utcnow()
        for job in jobs_crud.expired_leases(session, now=now):
            _recover_expired(session, settings, queue, job, report)
        for job in jobs_crud.stale_validating(session, before=now - timedelta(seconds=wait)):
            validate_and_queue(session, store=store, queue=queue, job=job)
            report.queued_validating.append(job.id)
        waiting = jobs_crud.waiting_since(session, before=now - timedelta(seconds=wait))
        depth = queue.depth() if waiting else None
        if waiting and (depth is None or depth < len(waiting)):
            for job in waiting:
                if enqueue(session, queue=queue, job=job, reason="sent to the broker again: its message was lost"):
                    report.reenqueued_lost.append(job.id)
    if report:
        log.info("reconciler: %s", report)
    return report


def _recover_expired(session, settings: Settings, queue: JobQueue, job, report: ReconcileReport) -> None:
    owner = job.lease_owner
    accept = (job.status,)
    if job.cancel_requested:
        if jobs_crud.finish(session, job_pk=job.pk, owner=owner, status=CANCELLED, accept=accept, message="cancelled (its worker was lost while stopping)"):
            report.cancelled_expired.append(job.id)
    elif job.attempts >= settings.max_attempts:
        error: dict[str, Any] = {
            "code": "worker_lost",
            "message": f"the job's worker stopped responding {job.attempts} times (last: {owner}); it may need more memory than a worker has",
            "param": None,
        }
        if jobs_crud.finish(session, job_pk=job.pk, owner=owner, status=FAILED, accept=accept, message=error["message"], level="error", error=error):
            report.failed_expired.append(job.id)
    elif jobs_crud.mark_queued(
        session,
        job_pk=job.pk,
        accept=(RUNNING,),
        message=f"worker {owner} stopped renewing its lease; re-queued to resume from the last checkpoint",
        level="warning",
    ):
        enqueue(session, queue=queue, job=job)
        report.requeued_expired.append(job.id)


class ReconcilerThread(threading.Thread):
    """Runs `reconcile_once` every `interval` seconds until stopped (inside the API process)."""

    def __init__(self, settings: Settings, queue: JobQueue, interval: float):
        super().__init__(name="qdpo-reconciler", daemon=True)
        self.settings, self.queue, self.interval = settings, queue, interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                reconcile_once(self.settings, self.queue)
            except Exception:  # a database or broker outage must not kill the loop
                log.exception("reconciler pass failed")

    def stop(self) -> None:
        self._stop_event.set()
