"""Real infrastructure for the service tests: a fresh Postgres database, a private Redis queue,
the API served over TCP by uvicorn in a thread, and a Celery worker as a separate process.

Nothing here fakes a component: the tests talk HTTP to the real app, which talks to the real
database and broker, and a real worker process runs the real pipeline on a tiny model.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from qdpo_cli.demo import free_port

PG_BASE_URL = os.environ.get("QDPO_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("QDPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def create_database(prefix: str) -> tuple[str, str]:
    """A new, empty Postgres database; returns (name, SQLAlchemy URL)."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_BASE_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        raise RuntimeError(f"PostgreSQL is not reachable at {PG_BASE_URL}; run `bash tests/ensure_services.sh` (or set QDPO_TEST_DATABASE_URL): {exc}") from exc
    finally:
        admin.dispose()
    return name, sa.engine.make_url(PG_BASE_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    admin = sa.create_engine(PG_BASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def clear_redis_queue(queue: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    client.close()


def settings_env(values: dict) -> dict:
    """QDPO_* environment variables equal to a Settings(**values)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("QDPO_")}
    for key, value in values.items():
        env[f"QDPO_{key.upper()}"] = json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class LiveServer:
    """The FastAPI app served by uvicorn on a free port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 30, what="the API server")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class WorkerProcess:
    """`qdpo worker` in its own process group (so a test can kill it like a lost machine)."""

    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path = env, log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> WorkerProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        name = f"test-{secrets.token_hex(3)}@%h"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qdpo_cli.main", "worker", "--loglevel=INFO", f"--hostname={name}"],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(lambda: self._ready(offset), timeout, 0.3, what=f"the worker to start (log: {self.log_path})")
        return self

    def _ready(self, offset: int) -> bool:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        if self.process.poll() is not None:
            raise RuntimeError(f"the worker exited with {self.process.returncode}:\n{text[-3000:]}")
        return " ready." in text

    def kill(self) -> None:
        """SIGKILL the worker and its pool: no cleanup, no acknowledgement, like a machine lost."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@dataclass
class Deployment:
    name: str
    settings: object
    base_url: str
    admin_key: str
    server: LiveServer | None = None
    worker: WorkerProcess | None = None
    env: dict = field(default_factory=dict)
    cleanup: list = field(default_factory=list)

    def client(self, key: str | None = None):
        from qdpo_client import Client

        return Client(self.base_url, api_key=key or self.admin_key, max_retries=1, timeout=60)

    def new_key(self, tenant: str) -> str:
        from service.crud.keys import create_key
        from service.db import session_factory

        with session_factory(self.settings.resolved_database_url)() as session:
            return create_key(session, tenant_name=tenant)[1]

    def sessions(self):
        from service.db import session_factory

        return session_factory(self.settings.resolved_database_url)()

    def restart_worker(self) -> None:
        self.worker = WorkerProcess(self.env, self.worker.log_path).start()
