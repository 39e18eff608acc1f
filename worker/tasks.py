"""Celery tasks. A message carries a job id and nothing else; the database has the rest."""

from __future__ import annotations

import logging

from celery import shared_task

from service.broker import TASK_NAME
from service.config import get_settings
from worker.runner import JobRunner, RetryLater

log = logging.getLogger(__name__)


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self, job_id: str) -> str:
    """Run the job with this id; retries (after the runner re-queued the row) on internal errors."""
    settings = self.app.conf.get("qdpo_settings") or get_settings()
    try:
        outcome = JobRunner(settings, job_id, self.request.id).run()
    except RetryLater as retry:
        raise self.retry(countdown=retry.countdown, max_retries=None) from None
    log.info("job %s: %s", job_id, outcome)
    return outcome
