"""The broker, owned by the service: the Celery configuration both the API and the workers use,
and the queue the API hands job ids to. Imports no torch and no task code (tasks are sent by name).

Settings that make a lost worker lose no job:
- acks_late + reject_on_worker_lost: a message is acknowledged only after its job finished, and
  goes back to the queue if the process running it dies;
- prefetch 1: a worker holding a long job does not sit on other jobs' messages;
- a visibility timeout (Redis) longer than any job, so a slow job is not handed to a second worker.
The database, not the broker, decides who runs a job (see service.crud.jobs.claim), so a message
delivered twice is harmless.

The embedded broker (kombu's filesystem transport) is polled, one message per poll: the worker
polls every EMBEDDED_POLL_SECONDS (kombu's default of one second made ~400 stale messages of
cancelled jobs hold a new job for minutes), and a job cancelled or deleted while queued has its
message file removed (`JobQueue.discard`), so it delays nobody.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from celery import Celery
from kombu.exceptions import ChannelError

from service.config import Settings

log = logging.getLogger(__name__)

TASK_NAME = "qdpo.run_job"
EMBEDDED_POLL_SECONDS = 0.1


def broker_transport_options(settings: Settings) -> dict:
    if settings.is_embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # One folder both ways: producer (API) and consumer (worker) share it.
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            "polling_interval": EMBEDDED_POLL_SECONDS,
        }
    return {"visibility_timeout": settings.visibility_timeout_seconds}


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """The Celery app of this deployment; a worker passes `include=["worker.tasks"]`, the API nothing."""
    app = Celery("qdpo", broker=settings.resolved_broker_url, include=list(include))
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue_name,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # job state lives in the database, never in a result backend
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        # Publishing happens inside an API request: fail fast and let the reconciler retry later.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_enable_remote_control=not settings.is_embedded_broker,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    app.conf.qdpo_settings = settings
    return app


class JobQueue:
    """Sends job ids to the broker; the message carries the id only, the worker reads the rest."""

    def __init__(self, settings: Settings):
        self.app = make_celery(settings)
        self.queue_name = settings.queue_name
        self.folder = settings.broker_folder / "queue" if settings.is_embedded_broker else None

    def enqueue(self, job_id: str, task_id: str | None = None) -> str:
        """Send the job's id; `task_id` is the message's id when the caller chose it (recorded beforehand)."""
        return self.app.send_task(TASK_NAME, args=[job_id], queue=self.queue_name, task_id=task_id).id

    def discard(self, job_id: str, task_id: str | None = None) -> int:
        """Remove the waiting messages of a job that will never run (cancelled or deleted while queued).

        Only the embedded broker needs it: its worker polls for one message at a time, so stale
        messages hold up the jobs behind them. Elsewhere a stale message is consumed at once and
        dropped by the claim. Returns the number of messages removed.
        """
        if self.folder is None or not self.folder.is_dir():
            return 0
        removed = 0
        for path in sorted(self.folder.glob(f"*.{self.queue_name}.msg")):
            if _message_is_for(path, job_id, task_id):
                try:
                    path.unlink()
                    removed += 1
                except FileNotFoundError:  # taken by the worker meanwhile
                    pass
        return removed

    def waiting_messages(self) -> list[tuple[str | None, list]]:
        """(task id, args) of every message waiting in the embedded broker's folder, oldest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        messages = []
        for path in sorted(self.folder.glob(f"*.{self.queue_name}.msg")):
            decoded = _read_message(path)
            if decoded is not None:
                messages.append(decoded)
        return messages

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


def _read_message(path: Path) -> tuple[str | None, list] | None:
    """(task id, task args) of a kombu filesystem message file (Celery protocol 2), or None if unreadable."""
    try:
        payload = json.loads(path.read_bytes())
        body = payload.get("body")
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0] if body else []
        return payload.get("headers", {}).get("id"), list(args)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None  # gone, or still being written


def _message_is_for(path: Path, job_id: str, task_id: str | None) -> bool:
    decoded = _read_message(path)
    if decoded is None:
        return False
    message_task_id, args = decoded
    return (task_id is not None and message_task_id == task_id) or args == [job_id]
