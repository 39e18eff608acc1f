"""Handing job ids to the broker. The API never imports the task code, it sends by name."""

from __future__ import annotations

import logging

from kombu.exceptions import ChannelError

from api.core.config import Settings
from worker.celery_app import TASK_NAME, make_celery

log = logging.getLogger(__name__)


class JobQueue:
    def __init__(self, settings: Settings):
        self.app = make_celery(settings)
        self.queue_name = settings.queue_name

    def enqueue(self, job_id: str) -> str:
        """Send `run_job(job_id)`; the message carries the id only, the worker reads the rest."""
        return self.app.send_task(TASK_NAME, args=[job_id], queue=self.queue_name).id

    def depth(self) -> int | None:
        """Messages waiting in the job queue, or None when the broker cannot tell."""
        try:
            with self.app.connection_for_write() as connection:
                return connection.default_channel.queue_declare(queue=self.queue_name, passive=True).message_count
        except ChannelError:  # Redis forgets an empty queue: "no such queue" means no messages
            return 0
        except Exception as exc:  # a broker that cannot count
            log.debug("queue depth unavailable: %s", exc)
            return None

    def ping(self, timeout: float = 3.0) -> None:
        """Raise if the broker cannot be reached within `timeout` seconds."""
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)

    def purge(self) -> int:
        with self.app.connection_for_write() as connection:
            return connection.default_channel.queue_purge(self.queue_name) or 0
