"""Engine and sessions for the deployment's database (Postgres in production, SQLite embedded).

SQLite gets WAL mode and a busy timeout because the API and the worker write to the same file
from different processes; without them a writer would fail at once instead of waiting its turn.

Postgres connections are bounded in time (`DatabaseOptions`, from the QDPO_DB_* settings): opening
one gives up after `connect_timeout`, a statement after `statement_timeout`, a wait for a pooled
connection after `pool_timeout`, and TCP keepalives notice a peer that vanished. An unreachable
database therefore fails fast, and `database_unavailable` turns such failures into the service's
`Unavailable` error (503 in the API) instead of a hang or a 500.
"""

from __future__ import annotations

import json
import select
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service.errors import Unavailable

_fast_loads: Callable[[bytes], Any] | None
try:
    from orjson import loads as _fast_loads
except ImportError:  # the standard library's parser does the same, only slower
    _fast_loads = None

# A number of 20 digits or more may be an integer beyond 64 bits, which orjson reads as a float. Every
# digit made a "0", such a number is a run of 20 zeros: found faster than by a regular expression.
_DIGITS_AS_ZEROS = bytes.maketrans(b"0123456789", b"0" * 10)
_TWENTY_DIGITS = b"0" * 20


def json_loads(data: bytes | str) -> Any:
    """The JSON columns' parser: what json.loads returns, by orjson where that is the same.

    Reading the JSON of every listed job was a sixth of the CPU of a list request; orjson parses it
    several times faster. It reads integers of 64 bits and more as floats and refuses numbers out of a
    float's range, so such text (rare: a job's settings are bounded) goes to json.loads as before.
    """
    if _fast_loads is not None and isinstance(data, bytes) and _TWENTY_DIGITS not in data.translate(_DIGITS_AS_ZEROS):
        try:
            return _fast_loads(data)
        except ValueError:
            pass
    return json.loads(data)


@dataclass(frozen=True)
class DatabaseOptions:
    """Pool and timeouts of one engine (`Settings.database_options()`); the defaults are the settings' defaults."""

    pool_size: int = 10
    max_overflow: int = 10
    pool_timeout: float = 10.0
    connect_timeout: int = 5
    statement_timeout: float = 30.0
    pre_ping: bool = True

    def postgres_connect_args(self) -> dict:
        args: dict[str, Any] = {
            "connect_timeout": self.connect_timeout,
            # a peer that vanished (network partition, dead host) is noticed in seconds, not hours
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": (self.connect_timeout + 5) * 1000,
        }
        if self.statement_timeout > 0:
            args["options"] = f"-c statement_timeout={int(self.statement_timeout * 1000)}"
        return args


def make_engine(url: str, pooled: bool = True, options: DatabaseOptions | None = None) -> Engine:
    """`pooled=False` for one-off runs (migrations, commands) that should leave no connections behind."""
    options = options or DatabaseOptions()
    pool_args = {} if pooled else {"poolclass": NullPool}
    if url.startswith("sqlite"):
        from pathlib import Path

        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool_args)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    postgres = make_url(url).get_backend_name() == "postgresql"
    connect_args = options.postgres_connect_args() if postgres else {}
    json_args = {"json_deserializer": json_loads} if postgres else {}
    if not pooled:  # migrations and commands may take their time, but not to find the database gone
        connect_args.pop("options", None)
        return create_engine(url, connect_args=connect_args, **json_args, **pool_args)
    engine = create_engine(
        url,
        connect_args=connect_args,
        **json_args,
        pool_pre_ping=options.pre_ping and not postgres,
        pool_size=options.pool_size,
        max_overflow=options.max_overflow,
        pool_timeout=options.pool_timeout,
    )
    if options.pre_ping and postgres:
        _ping_when_spoken_to(engine)
    return engine


def make_async_engine(url: str, options: DatabaseOptions, pool_size: int) -> AsyncEngine | None:
    """An engine of asyncio connections for reads awaited on an event loop; None for a database other than Postgres.

    psycopg's own async connections (the URL's driver becomes `psycopg`), with the same timeouts,
    keepalives, JSON parser and pre-ping as `make_engine`'s, each statement in autocommit (it only
    reads). `pool_size` connections and no overflow: the caller runs at most that many reads at once.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    engine = create_async_engine(
        parsed.set(drivername="postgresql+psycopg"),
        connect_args=options.postgres_connect_args(),
        json_deserializer=json_loads,
        isolation_level="AUTOCOMMIT",
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=options.pool_timeout,
    )
    if options.pre_ping:
        _ping_when_spoken_to(engine.sync_engine)
    return engine


def _ping_when_spoken_to(engine: Engine) -> None:
    """Pre-ping for Postgres without a round trip per checkout (SQLAlchemy's sends `SELECT 1` every time).

    An idle connection in the pool has nothing to read. A server that shuts down, restarts or ends the
    backend sends its goodbye and closes the socket (as a peer that aborts the connection resets it),
    so a readable socket is what a broken connection looks like: only then is the real ping sent, and
    if it fails the pool is invalidated and a new connection made, exactly as with pool_pre_ping.
    """
    dialect = engine.dialect

    def check(dbapi_connection, _record, _proxy) -> None:
        try:
            poller = select.poll()
            # an asyncio connection is wrapped by SQLAlchemy's adapter; the driver's connection has the socket
            poller.register(getattr(dbapi_connection, "driver_connection", dbapi_connection).fileno(), select.POLLIN)
            quiet = not poller.poll(0)
        except Exception:  # closed already, or no socket to ask: the real ping decides
            quiet = False
        if not quiet and not dialect._do_ping_w_event(dbapi_connection):
            raise sa_exc.InvalidatePoolError()  # the pool retries the checkout on a new connection

    event.listen(engine, "checkout", check)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache(maxsize=16)
def engine_for(url: str, options: DatabaseOptions | None = None) -> Engine:
    """One engine (one pool) per database URL, options and process; no options: the deployment's settings."""
    if options is None:
        from service.config import get_settings

        return engine_for(url, get_settings().database_options())
    return make_engine(url, options=options)


def session_factory(url: str, options: DatabaseOptions | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(url, options), expire_on_commit=False)


@contextmanager
def session_scope(url: str, options: DatabaseOptions | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (for workers and commands)."""
    session = session_factory(url, options)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def database_unavailable(exc: BaseException, retry_after: int = 5) -> Unavailable | None:
    """The `Unavailable` error for a failure that means "the database cannot serve right now", else None.

    Unreachable, restarting or refusing connections, a connection broken mid-statement, a statement
    timeout, every pooled connection busy for `pool_timeout`: retrying later can succeed. Anything
    else (a constraint violation, a bad statement) is a bug or a conflict and stays what it is.
    """
    if isinstance(exc, sa_exc.TimeoutError):
        reason = "every database connection of this server is busy"
    elif isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)) or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated):
        reason = "the database cannot be reached"
    else:
        return None
    return Unavailable(f"{reason}; try again in {retry_after} s", code="database_unavailable", retry_after=retry_after)


def is_database_unavailable(exc: BaseException) -> bool:
    return database_unavailable(exc) is not None
