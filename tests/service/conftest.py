"""Session-wide deployments for the service tests (see infra.py).

- `api_deployment`: the API on a fresh Postgres database and a private Redis queue that no worker
  reads, so jobs stay queued; the reconciler is driven by hand.
- `worker_deployment`: another database and queue, with a real Celery worker process running
  jobs on a tiny random Llama; leases and the in-app reconciler run on short timers.
"""

from __future__ import annotations

import secrets

import pytest

from .infra import REDIS_URL, Deployment, LiveServer, WorkerProcess, clear_redis_queue, create_database, drop_database, settings_env

# A job that runs the whole pipeline on the tiny model in well under a minute.
TINY_JOB = {
    "model": "tiny",
    "quantization": {"method": "rtn", "bits": 2, "group_size": 32},
    "dataset": {"max_train_prompts": 8, "max_eval_prompts": 4},
    "generation": {"max_new_tokens": 8},
    "eval": {"max_new_tokens": 8},
    "method": {"type": "qdpo", "hyperparameters": {"epochs": 1, "batch_size": 4}},
}


def _deployment(name: str, tmp_path_factory, overrides: dict) -> tuple[Deployment, list]:
    from api.main import create_app
    from service.config import Settings
    from service.migrate import upgrade

    db_name, db_url = create_database(f"qdpo_test_{name}")
    queue = f"qdpo_test_{name}_{secrets.token_hex(4)}"
    root = tmp_path_factory.mktemp(f"deployment-{name}")
    values = {
        "database_url": db_url,
        "broker_url": REDIS_URL,
        "queue_name": queue,
        "var_dir": str(root / "var"),
        "artifact_dir": str(root / "artifacts"),
        "reconcile_interval_seconds": 0,
        **overrides,
    }
    settings = Settings(**values)
    upgrade(db_url)
    server = LiveServer(create_app(settings)).start()
    deployment = Deployment(name=name, settings=settings, base_url=server.url, admin_key="", server=server, env=settings_env(values))
    deployment.admin_key = deployment.new_key(f"tenant-{name}")
    cleanup = [server.stop, lambda: clear_redis_queue(queue), lambda: drop_database(db_name)]
    return deployment, cleanup


def _teardown(cleanup: list) -> None:
    errors = []
    for step in cleanup:
        try:
            step()
        except Exception as exc:  # keep tearing down the rest
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def api_deployment(tmp_path_factory):
    deployment, cleanup = _deployment("api", tmp_path_factory, {"max_upload_bytes": 64 * 1024, "max_request_bytes": 16 * 1024})
    yield deployment
    _teardown(cleanup)


@pytest.fixture(scope="session")
def worker_deployment(tmp_path_factory, tiny_model_dir):
    overrides = {
        "extra_models": {"tiny": str(tiny_model_dir), "ghost": str(tiny_model_dir.parent / "no-such-model")},
        "lease_seconds": 4,
        "heartbeat_seconds": 1,
        "cancel_poll_seconds": 0.3,
        "reconcile_interval_seconds": 1,
        "requeue_after_seconds": 3,
        "retry_backoff_seconds": 1,
    }
    deployment, cleanup = _deployment("worker", tmp_path_factory, overrides)
    deployment.worker = WorkerProcess(deployment.env, tmp_path_factory.mktemp("worker-log") / "worker.log").start()
    yield deployment
    _teardown([lambda: deployment.worker.stop(), *cleanup])


@pytest.fixture
def api(api_deployment):
    """A client of the API-only deployment, as a fresh tenant (tests do not see each other's objects)."""
    key = api_deployment.new_key(f"t-{secrets.token_hex(4)}")
    with api_deployment.client(key) as client:
        yield client


@pytest.fixture
def tenant_key(api_deployment):
    return api_deployment.new_key(f"t-{secrets.token_hex(4)}")
