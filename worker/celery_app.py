"""The Celery application, configured from the deployment's settings. Imports no torch.

Start a worker with `qdpo worker` (or `celery -A worker.celery_app worker -Q <QDPO_QUEUE_NAME>`).
The API imports this module too, only to send `run_job(job_id)` messages by name.

Settings that make a lost worker lose no job:
- acks_late + reject_on_worker_lost: a message is acknowledged only after its job finished, and
  goes back to the queue if the process running it dies;
- prefetch 1: a worker holding a long job does not sit on other jobs' messages;
- a visibility timeout (Redis) longer than any job, so a slow job is not handed to a second worker.
The database, not the broker, decides who runs a job (see api.crud.jobs.claim), so a message
delivered twice is harmless.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from celery.signals import worker_process_init

from api.core.config import Settings, get_settings

TASK_NAME = "qdpo.run_job"


def broker_transport_options(settings: Settings) -> dict:
    if settings.is_embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # One folder both ways: producer (API) and consumer (worker) share it.
        return {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"), "control_folder": str(folder / "control"), "processed_folder": str(folder / "processed")}
    return {"visibility_timeout": settings.visibility_timeout_seconds}


def make_celery(settings: Settings) -> Celery:
    app = Celery("qdpo", broker=settings.resolved_broker_url, include=["worker.tasks"])
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


@worker_process_init.connect
def _fresh_database_connections(**_kwargs) -> None:
    # A forked pool process must not share the parent's pooled database connections.
    from api.core.db import engine_for

    engine_for.cache_clear()


@lru_cache(maxsize=1)
def default_app() -> Celery:
    return make_celery(get_settings())


def __getattr__(name: str):
    # `celery -A worker.celery_app` looks up `app`; building it lazily keeps a plain import free of
    # side effects (the embedded broker creates its folders).
    if name in ("app", "celery"):
        return default_app()
    raise AttributeError(name)
