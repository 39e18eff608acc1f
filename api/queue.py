"""Handing job ids to the broker. The API never imports the task code, it sends by name."""

from __future__ import annotations

import logging

from api.core.config import QUEUE_NAME, Settings
from worker.celery_app import TASK_NAME, make_celery

log = logging.getLogger(__name__)


class JobQueue:
    def __init__(self, settings: Settings):
        self.app = make_celery(settings)

    def enqueue(self, job_id: str) -> str:
        """Send `run_job(job_id)`; the message carries the id only, the worker reads the rest."""
        return self.app.send_task(TASK_NAME, args=[job_id], queue=QUEUE_NAME).id

    def depth(self) -> int | None:
        """Messages waiting in the job queue, or None when the broker cannot tell."""
        try:
            with self.app.connection_for_write() as connection:
                return connection.default_channel.queue_declare(queue=QUEUE_NAME, passive=True).message_count
        except Exception as exc:  # a queue nobody declared yet, or a broker that does not count
            log.debug("queue depth unavailable: %s", exc)
            return None

    def ping(self, timeout: float = 3.0) -> None:
        """Raise if the broker cannot be reached within `timeout` seconds."""
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)

    def purge(self) -> int:
        with self.app.connection_for_write() as connection:
            return connection.default_channel.queue_purge(QUEUE_NAME) or 0
