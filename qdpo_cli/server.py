"""Server-side commands of `qdpo`: serve, api, worker, dispatcher, migrate, reconcile, keys.

They read the deployment's QDPO_* settings and import the API / worker code only when run, so the
client commands stay light. `qdpo serve` is the embedded, zero-configuration service: it applies
the migrations, makes sure an API key exists (printing it), writes the client config (its URL and
that key, so `qdpo` client commands work from any directory), starts one worker process (which
starts a webhook dispatcher beside it) and serves the API in the foreground until interrupted.

The key commands read the deployment's database and never create one: a missing or unmigrated
database is reported with its URL and the fix (`qdpo migrate`, QDPO_DATABASE_URL, QDPO_VAR_DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

WORKER_STOP_GRACE_S = 10


class CommandError(Exception):
    """A server command cannot run as asked; the message names the setting and the fix (printed without a traceback)."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="embedded service: migrate, API key, one worker process, API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--no-worker", action="store_true", help="serve the API only")
    serve.add_argument("--no-client-config", action="store_true", help="do not write this service's URL and key to the client config")
    serve.set_defaults(handler=cmd_serve)
    api = sub.add_parser("api", help="serve the REST API only (production: run `qdpo migrate` first)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--workers", type=int, help="API processes (default QDPO_API_WORKERS, 1); about one per CPU core")
    api.set_defaults(handler=cmd_api)
    worker = sub.add_parser("worker", help="run a Celery worker for jobs")
    worker.add_argument("--concurrency", type=int, help="jobs at once (default QDPO_WORKER_CONCURRENCY)")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--hostname", help="Celery node name (default qdpo@<host>)")
    worker.add_argument("--no-dispatcher", action="store_true", help="do not start a webhook dispatcher beside the worker")
    worker.set_defaults(handler=cmd_worker)
    dispatcher = sub.add_parser("dispatcher", help="send webhook deliveries (every `qdpo worker` already runs one)")
    dispatcher.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # stop when the process that started it is gone
    dispatcher.set_defaults(handler=cmd_dispatcher)
    sub.add_parser("migrate", help="apply the database migrations").set_defaults(handler=cmd_migrate)
    sub.add_parser("reconcile", help="one reconciler pass: re-enqueue lost jobs, recover expired leases").set_defaults(handler=cmd_reconcile)
    keys = sub.add_parser("keys", help="create, list and revoke API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a key for a tenant (created if new); prints it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="a label for the key")
    create.set_defaults(handler=cmd_keys_create)
    listing = keys.add_parser("list", help="list keys (prefixes only)")
    listing.add_argument("--tenant")
    listing.set_defaults(handler=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id (key_…) or prefix")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=cmd_keys_revoke)


def _settings():
    from service.config import get_settings

    return get_settings()


def _sessions(settings):
    from service.db import session_factory

    return session_factory(settings.resolved_database_url)


def _database_origin(settings) -> str:
    if settings.database_url:
        return "from QDPO_DATABASE_URL"
    var_dir = f"QDPO_VAR_DIR={settings.var_dir}" if os.environ.get("QDPO_VAR_DIR") else f"the default QDPO_VAR_DIR={settings.var_dir}"
    relative = "" if Path(settings.var_dir).is_absolute() else f", relative to the current directory {Path.cwd()}"
    return f"QDPO_DATABASE_URL is unset, so the embedded SQLite file under {var_dir}{relative}"


def _migrated_sessions(settings):
    """Sessions on the deployment's database, which must exist and carry the current schema; nothing is created here."""
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from service.migrate import alembic_config, current_revision

    url = settings.resolved_database_url
    shown = make_url(url).render_as_string(hide_password=True)
    where = f"{shown} ({_database_origin(settings)})"
    elsewhere = "or point to the deployment's database with QDPO_DATABASE_URL (or QDPO_VAR_DIR for an embedded one)"
    fix = f"run `qdpo migrate` to create its schema there, {elsewhere}"
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:" and not Path(path).is_file():
            raise CommandError(f"no qdpo database at {where}\nrun `qdpo migrate` to create it there, {elsewhere}")
    try:
        revision = current_revision(url)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise CommandError(f"cannot open the database at {where}: {reason}\ncheck QDPO_DATABASE_URL, or that the database server is up") from None
    if revision is None:
        raise CommandError(f"the database at {where} has no qdpo schema\n{fix}")
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    if revision != head:
        raise CommandError(f"the database at {where} is at schema revision {revision}, this qdpo needs {head}\nrun `qdpo migrate`")
    return _sessions(settings)


def write_client_config(base_url: str, api_key: str | None) -> Path:
    """The client config (qdpo_client.config): this service's URL and key, readable by the user only."""
    from qdpo_client.config import config_path

    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump({"base_url": base_url, "api_key": api_key}, handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o600)  # whatever the umask
    os.replace(tmp, path)
    return path


def cmd_migrate(_args) -> int:
    from service.migrate import upgrade

    settings = _settings()
    upgrade(settings.resolved_database_url)
    print("database is at the latest schema")
    return 0


def ensure_embedded_key(settings) -> str | None:
    """The key the embedded service prints: QDPO_BOOTSTRAP_API_KEY, or one made on first start and kept in var/api_key."""
    from service.crud import keys as keys_crud

    with _sessions(settings)() as session:
        if settings.bootstrap_api_key:
            keys_crud.ensure_key(session, key=settings.bootstrap_api_key)
            return settings.bootstrap_api_key
        key_file = settings.var_dir / "api_key"
        if key_file.is_file() and keys_crud.authenticate(session, key=key_file.read_text().strip()):
            return key_file.read_text().strip()
        if keys_crud.has_any_key(session):
            return None  # a managed deployment: keys come from `qdpo keys create`
        _, key = keys_crud.create_key(session, tenant_name=keys_crud.DEFAULT_TENANT, name="embedded")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def cmd_serve(args) -> int:
    from service.migrate import upgrade

    settings = _settings()
    upgrade(settings.resolved_database_url)
    key = ensure_embedded_key(settings)
    host, port = args.host or settings.host, args.port or settings.port
    print(f"qdpo: API on http://{host}:{port}  (docs: /docs)", flush=True)
    if key:
        print(f"qdpo: API key for tenant 'default': {key}  (also in {settings.var_dir / 'api_key'})", flush=True)
    if not args.no_client_config:
        from qdpo_client.config import url_for

        try:
            path = write_client_config(url_for(host, port), key)
            print(f"qdpo: client config written to {path}: `qdpo` commands and Client() find this service from any directory", flush=True)
        except OSError as exc:
            print(f"qdpo: could not write the client config ({exc}); pass --base-url and --api-key to client commands", flush=True)
    worker = None
    if not args.no_worker:
        worker = subprocess.Popen([sys.executable, "-m", "qdpo_cli.main", "worker"], env=os.environ.copy())
    else:  # webhooks are still sent
        worker = start_dispatcher()
    try:
        return _run_api(settings, host, port)
    finally:
        if worker is not None:
            _stop(worker)


def _stop(process: subprocess.Popen) -> None:
    """Warm shutdown first; a job still running then is killed and resumes on the next start."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(WORKER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cmd_api(args) -> int:
    settings = _settings()
    workers = args.workers or settings.api_workers
    if workers < 1:
        raise CommandError(f"--workers {workers}: give at least 1 API process")
    return _run_api(settings, args.host or settings.host, args.port or settings.port, workers=workers)


def _run_api(settings, host: str, port: int, workers: int = 1) -> int:
    import uvicorn

    from api.main import create_served_app

    if settings.bootstrap_api_key:
        ensure_embedded_key(settings)
    options = {"host": host, "port": port, "log_level": "info", "proxy_headers": True, "access_log": settings.api_access_log}
    if workers == 1:
        uvicorn.run(create_served_app(settings), **options)
    else:
        # Several processes share the port; each builds the app from the same QDPO_* environment
        # (api.main.create_served_app with no arguments) with its own connection pool and reconciler thread
        # (reconciler passes are compare-and-sets: running several at once does nothing twice).
        uvicorn.run("api.main:create_served_app", factory=True, workers=workers, **options)
    return 0


def cmd_worker(args) -> int:
    from worker.celery_app import make_worker_app

    settings = _settings()
    settings.register_models()
    app = make_worker_app(settings)
    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        "-Q",
        settings.queue_name,
        f"--concurrency={args.concurrency or settings.worker_concurrency}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    dispatcher = None if args.no_dispatcher else start_dispatcher()
    try:
        app.worker_main(argv)
    finally:
        if dispatcher is not None:
            _stop(dispatcher)
    return 0


def start_dispatcher() -> subprocess.Popen:
    """A webhook dispatcher in its own process (so no receiver can hold up a job), ending with this one."""
    return subprocess.Popen([sys.executable, "-m", "qdpo_cli.main", "dispatcher", f"--parent-pid={os.getpid()}"], env=os.environ.copy())


def cmd_dispatcher(args) -> int:
    import logging
    import threading

    from worker.webhooks import Dispatcher

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/webhooks] %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    dispatcher = Dispatcher(_settings())
    try:
        dispatcher.run(stop, parent_pid=args.parent_pid)
    finally:
        dispatcher.stop(grace=5)
    return 0


def cmd_reconcile(_args) -> int:
    from service.broker import JobQueue
    from service.reconciler import reconcile_once

    settings = _settings()
    report = reconcile_once(settings, JobQueue(settings))
    print(report)
    return 0


def cmd_keys_create(args) -> int:
    from service.crud import keys as keys_crud

    with _migrated_sessions(_settings())() as session:
        record, key = keys_crud.create_key(session, tenant_name=args.tenant, name=args.name)
        print(f"created {record.id} for tenant {args.tenant!r}; the key is shown only now:\n{key}")
    return 0


def cmd_keys_list(args) -> int:
    from service.crud import keys as keys_crud

    with _migrated_sessions(_settings())() as session:
        for record in keys_crud.list_keys(session, tenant_name=args.tenant):
            state = f"revoked {record.revoked_at:%Y-%m-%d}" if record.revoked_at else "active"
            print(f"{record.id}  {record.key_prefix}…  tenant={record.tenant.name}  name={record.name or '-'}  {state}")
    return 0


def cmd_keys_revoke(args) -> int:
    from service.crud import keys as keys_crud

    with _migrated_sessions(_settings())() as session:
        record = keys_crud.revoke_key(session, key_id=args.key_id)
    if record is None:
        print(f"no key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {record.id}")
    return 0
