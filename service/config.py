"""Settings of a qdpo deployment: one class, read from QDPO_* environment variables.

The API, the worker, Alembic (migrations/env.py) and the CLI's server commands all build the same
`Settings`, so a deployment is configured in exactly one place. With no variables at all the
embedded defaults apply: a SQLite file, a Celery broker on the filesystem and an artifact
directory, all under ./var, so `qdpo serve` works on a laptop with nothing installed.

    QDPO_DATABASE_URL=postgresql+psycopg://qdpo:secret@db/qdpo QDPO_BROKER_URL=redis://redis:6379/0 qdpo api
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from qdpo_core.outbound import OutboundPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QDPO_", env_file=None, extra="ignore", env_ignore_empty=True)

    # Where the embedded defaults live (SQLite file, filesystem broker, artifacts).
    var_dir: Path = Field(Path("var"), description="Directory of the embedded defaults (database file, broker folder, artifacts).")
    database_url: str | None = Field(None, description="SQLAlchemy URL; empty = SQLite file <var_dir>/qdpo.db.")
    broker_url: str | None = Field(None, description="Celery broker URL (redis://host:6379/0); empty = kombu filesystem broker under <var_dir>/broker.")
    queue_name: str = Field("qdpo.jobs", description="Broker queue of job messages (separate deployments can share one broker).")
    artifact_dir: Path | None = Field(None, description="Uploaded files and job outputs, shared by API and workers; empty = <var_dir>/artifacts.")

    # Models offered on top of the bundled one, as JSON {"name": "/path/to/hf-dir" or "org/hub-id"}.
    extra_models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict, description='Extra models as JSON, e.g. {"tiny-llama": "/models/tiny"}.')
    device: str = Field("auto", description="Device the worker trains on: auto, cpu, cuda, cuda:N.")

    # Outbound calls a job asks for (labeler and judge endpoints): never to private networks unless allowed
    outbound_allow_private: bool = Field(
        False, description="Let jobs call endpoints on loopback, link-local, private and other non-global addresses (off: only public ones)."
    )
    outbound_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Networks jobs may call even though they are not public, comma-separated CIDRs, e.g. 10.0.5.0/24,fd00::/8."
    )

    # API
    host: str = Field("127.0.0.1", description="Address `qdpo serve` / `qdpo api` binds to.")
    port: int = Field(8000, description="Port `qdpo serve` / `qdpo api` listens on.")
    max_upload_bytes: int = Field(50 * 1024 * 1024, description="Largest accepted dataset file; bigger uploads get 413.")
    max_request_bytes: int = Field(256 * 1024, description="Largest accepted body of any request other than a file upload (a job's JSON); bigger get 413.")
    bootstrap_api_key: str | None = Field(None, description="When set, `qdpo serve`/`qdpo api` make sure this key exists for tenant 'default'.")
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    event_stream_poll_seconds: float = Field(0.5, description="How often the SSE event stream polls the database.")
    api_workers: int = Field(1, ge=1, description="API processes `qdpo api` runs (uvicorn workers; `--workers` overrides).")
    api_threads: int = Field(40, ge=1, description="Threads per API process for blocking work (database queries, files).")
    api_access_log: bool = Field(True, description="Log every request (uvicorn's access log); off when a proxy in front logs them.")
    api_key_cache_seconds: float = Field(
        5.0, ge=0, description="How long an API process trusts a key it has checked; a revoked key stops working within this time (0 = check every request)."
    )

    # Database connections (API, worker and reconciler alike)
    db_pool_size: int = Field(10, ge=1, description="Connections each process keeps open to the database; an API process serves this many requests at once.")
    db_read_concurrency: int = Field(
        6,
        ge=1,
        description="Reads each API process awaits at once on its event loop (GET of a job; Postgres), each on a connection of their own pool; more wait their turn in order.",
    )
    db_max_overflow: int = Field(10, ge=0, description="Connections a process may open beyond the pool for a moment (probes, event streams, the reconciler).")
    db_pool_timeout_seconds: float = Field(10.0, gt=0, description="Longest wait for a free connection; then the request answers 503.")
    db_connect_timeout_seconds: int = Field(
        5, ge=1, description="Longest wait to open a database connection (Postgres); an unreachable database answers 503 after this."
    )
    db_statement_timeout_seconds: float = Field(30.0, ge=0, description="Postgres statement_timeout of every session (0 = none).")
    db_pool_pre_ping: bool = Field(
        True, description="Test a pooled connection before using it (a connection broken by a database restart is replaced, not failed)."
    )
    db_retry_after_seconds: int = Field(5, ge=1, description="Retry-After of a 503 answered because the database is unavailable.")

    # Worker and job lifecycle
    worker_concurrency: int = Field(1, description="Jobs one worker process runs at once (one per GPU).")
    lease_seconds: float = Field(120.0, description="A running job whose lease is not renewed for this long is taken as dead and re-queued.")
    heartbeat_seconds: float = Field(20.0, description="How often a worker renews the lease of the job it runs.")
    cancel_poll_seconds: float = Field(1.0, description="How often a running job checks the database for a cancel request.")
    max_attempts: int = Field(3, description="Runs of one job (first run + retries after internal errors or lost workers) before it fails.")
    retry_backoff_seconds: float = Field(10.0, description="Delay before re-running a job after an internal error (doubles each attempt).")
    db_outage_wait_seconds: float = Field(
        3600.0,
        ge=0,
        description="How long a worker keeps trying to record a finished job while the database is unreachable (its events wait in a spool meanwhile).",
    )
    visibility_timeout_seconds: int = Field(
        7 * 24 * 3600, description="Redis broker: an unacknowledged job message is redelivered after this long; keep it longer than any job."
    )

    # Webhooks (sent by the dispatcher `qdpo worker` starts beside itself, or `qdpo dispatcher`)
    webhook_max_endpoints: int = Field(20, description="Webhook endpoints one tenant may register.")
    webhook_timeout_seconds: float = Field(10.0, description="How long one delivery attempt waits to connect and for the receiver's answer.")
    webhook_retry_base_seconds: float = Field(5.0, description="Delay before the first retry of a failed delivery; it doubles with every attempt.")
    webhook_retry_max_interval_seconds: float = Field(3600.0, description="Longest delay between two attempts of one delivery.")
    webhook_retry_window_seconds: float = Field(
        24 * 3600.0, description="A delivery not answered with 2xx within this long after its event is given up (failed)."
    )
    webhook_poll_seconds: float = Field(1.0, description="How often the dispatcher looks for deliveries that are due.")
    webhook_concurrency: int = Field(8, description="Deliveries one dispatcher sends at once (at most 2 to the same endpoint).")

    # Reconciler (runs inside the API process; `qdpo reconcile` runs one pass by hand)
    reconcile_interval_seconds: float = Field(30.0, description="Seconds between reconciler passes in the API process; 0 = off.")
    requeue_after_seconds: float = Field(120.0, description="A job queued this long with no message in the broker is enqueued again.")

    @field_validator("extra_models", mode="before")
    @classmethod
    def _parse_models(cls, value):
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError as exc:
                raise ValueError(f'QDPO_EXTRA_MODELS is not valid JSON ({exc}); use e.g. {{"tiny": "/models/tiny"}}') from exc
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError('QDPO_EXTRA_MODELS must be a JSON object of names to model directories, e.g. {"tiny": "/models/tiny"}')
        return value

    @field_validator("outbound_allowed_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value):
        import ipaddress

        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"QDPO_OUTBOUND_ALLOWED_NETWORKS: {network!r} is not a network ({exc}); use CIDRs such as 10.0.5.0/24") from exc
        return value

    def outbound_policy(self) -> OutboundPolicy:
        """Where jobs may send requests: checked by the API when a job is created and by the worker on every connection."""
        return OutboundPolicy(
            allow_private=self.outbound_allow_private,
            allowed_networks=tuple(self.outbound_allowed_networks),
            how_to_allow="ask the operator to allow its network (QDPO_OUTBOUND_ALLOWED_NETWORKS, or QDPO_OUTBOUND_ALLOW_PRIVATE=true)",
        )

    def database_options(self):
        """The connection settings every engine of this deployment uses (service.db)."""
        from service.db import DatabaseOptions

        return DatabaseOptions(
            pool_size=self.db_pool_size,
            max_overflow=self.db_max_overflow,
            pool_timeout=self.db_pool_timeout_seconds,
            connect_timeout=self.db_connect_timeout_seconds,
            statement_timeout=self.db_statement_timeout_seconds,
            pre_ping=self.db_pool_pre_ping,
        )

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.var_dir / "artifacts").resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'qdpo.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def is_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        return (self.var_dir / "broker").resolve()

    def register_models(self) -> None:
        """Make the deployment's extra models known to qdpo_core's registry (API and worker alike)."""
        from qdpo_core import registry

        for name, source in self.extra_models.items():
            registry.register_model(name, source, description="registered by this deployment")


@lru_cache
def get_settings() -> Settings:
    return Settings()
