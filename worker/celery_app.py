"""The workers' Celery application: the service's broker configuration plus the job task.

Start a worker with `qdpo worker` (or `celery -A worker.celery_app worker -Q <QDPO_QUEUE_NAME>`).
Imports no torch: the worker's parent process forks its pool before any job loads it.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from celery.signals import worker_process_init

from service.broker import make_celery
from service.config import Settings, get_settings

TASK_MODULES = ["worker.tasks"]


def make_worker_app(settings: Settings) -> Celery:
    return make_celery(settings, include=TASK_MODULES)


@worker_process_init.connect
def _fresh_database_connections(**_kwargs) -> None:
    # A forked pool process must not share the parent's pooled database connections.
    from service.db import engine_for

    engine_for.cache_clear()


@lru_cache(maxsize=1)
def default_app() -> Celery:
    return make_worker_app(get_settings())


def __getattr__(name: str):
    # `celery -A worker.celery_app` looks up `app`; building it lazily keeps a plain import free of
    # side effects (the embedded broker creates its folders).
    if name in ("app", "celery"):
        return default_app()
    raise AttributeError(name)
