"""Request dependencies: settings, a database session, the artifact store, the queue, the tenant.

No request holds a database connection while it waits for anything else. The routes are sync
functions that FastAPI runs in a worker thread; their session is created here without touching
the database, takes a pooled connection at its first query inside that thread and gives it back
when the route commits, or when the request ends. The tenant is found without the request's
session (from a short cache, or with a session of its own that is closed before the route runs),
so a request never waits for a thread while it sits on a connection — with 64 clients that made
every pooled connection idle in transaction while all threads waited for one.

A request takes one of the process's database slots (as many as the pool keeps connections, less
a few kept for key lookups) before its route runs, and gives it back when the route returned: while
all are taken, further requests wait on the event loop — holding no thread and no connection —
for at most QDPO_DB_POOL_TIMEOUT_SECONDS, then answer 503. So a thread never blocks on an
exhausted pool while the requests that hold its connections wait for a thread (FastAPI also
validates a sync route's response in the thread pool, after the route returned).

The trivial dependencies are `async def`: FastAPI runs a sync dependency in the thread pool,
a thread hop per request each for nothing.

The busy routes that write do all their blocking work in that one thread: they give their
connection back (`release`) and serialize their answer there (api.core.responses), where otherwise
FastAPI would hop to a thread again to validate the returned model and the session's teardown once
more to roll back.

The busiest reads (GET of a job, the job list) take no thread at all: on Postgres they are awaited
on the event loop (`LoopReads`, asyncio connections of a small pool of their own), so they cost no
thread hop and no thread of theirs fights the event loop and the other threads for the interpreter
lock; with 64 clients that contention made the slowest requests twice the median, and the hop was a
tenth of the CPU. At most QDPO_DB_READ_CONCURRENCY such reads run at once; the rest wait in order
(a fair semaphore: the pool's own queue lets a newcomer take a connection a waiter was woken for,
and under load some requests then waited seconds). With SQLite the same reads run in a thread. Their
statements run without a transaction (autocommit), each seeing the data committed when it starts,
as in a READ COMMITTED transaction, but without the BEGIN and ROLLBACK round trips; they never write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

import anyio
from cachetools import TTLCache
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Executable, Result, Row
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker

from api.core.errors import ApiError
from service.broker import JobQueue
from service.config import Settings
from service.crud import keys as keys_crud
from service.db import make_async_engine
from service.errors import Unavailable
from service.security import hash_api_key
from service.storage import ArtifactStore
from service.tables import Tenant

T = TypeVar("T")

bearer = HTTPBearer(auto_error=False, description="An API key from `qdpo keys create --tenant NAME`.")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def install_request_state(app, settings: Settings) -> None:
    """The per-process state these dependencies use: key cache, database slots and read sessions (see the module docstring)."""
    # Same pool as app.state.sessions. At READ COMMITTED every statement sees what was committed when
    # it started, in a transaction or not, so a read answers the same without one.
    app.state.read_sessions = sessionmaker(bind=app.state.sessions.kw["bind"].execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
    # Within the pool's steady size: an overflow connection is opened and closed again per use (a
    # new Postgres backend each time), so requests never count on it; it serves the rest (readiness
    # probes, metrics scrapes, event streams, the reconciler).
    capacity = settings.db_pool_size
    lookups = max(1, min(4, capacity // 4))
    app.state.tenant_cache = TTLCache(maxsize=10_000, ttl=settings.api_key_cache_seconds) if settings.api_key_cache_seconds > 0 else None
    app.state.db_slots = asyncio.Semaphore(max(1, capacity - lookups))
    app.state.key_lookup_slots = asyncio.Semaphore(lookups)
    app.state.reads = LoopReads(settings, app.state.read_sessions)


class LoopReads:
    """Read-only statements awaited on the event loop (see the module docstring); the app's lifespan opens and closes it.

    Postgres: asyncio connections of a pool of QDPO_DB_READ_CONCURRENCY. Another database, or an app
    whose lifespan has not run: the read session's connection, in a thread.
    """

    def __init__(self, settings: Settings, read_sessions: sessionmaker[Session]):
        self.settings, self.read_sessions = settings, read_sessions
        self.slots = asyncio.Semaphore(settings.db_read_concurrency)
        self.engine: AsyncEngine | None = None

    def open(self) -> None:
        self.engine = make_async_engine(self.settings.resolved_database_url, self.settings.database_options(), self.settings.db_read_concurrency)

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.dispose()

    async def first(self, statement: Executable, params: dict) -> Row | None:
        """The statement's first row, or None."""
        return await self._run(statement, params, _first_row)

    async def all(self, statement: Executable, params: dict) -> list[Row]:
        """Every row of the statement."""
        return await self._run(statement, params, list)

    async def _run(self, statement: Executable, params: dict, take: Callable[[Result], T]) -> T:
        await _wait_for_slot(self.settings, self.slots)
        try:
            if self.engine is None:
                return await anyio.to_thread.run_sync(self._run_in_thread, statement, params, take)
            async with self.engine.connect() as connection:
                return take(await connection.execute(statement, params))
        finally:
            self.slots.release()

    def _run_in_thread(self, statement: Executable, params: dict, take: Callable[[Result], T]) -> T:
        with self.read_sessions() as session:
            return take(session.connection().execute(statement, params))


def _first_row(result: Result) -> Row | None:
    return result.first()


async def _take(request: Request, semaphore: asyncio.Semaphore) -> None:
    await _wait_for_slot(request.app.state.settings, semaphore)


async def _wait_for_slot(settings: Settings, semaphore: asyncio.Semaphore) -> None:
    """Take one of `semaphore`'s slots, waiting at most QDPO_DB_POOL_TIMEOUT_SECONDS (then 503)."""
    if not semaphore.locked():  # a free slot is taken at once (no timer task for a wait that cannot happen)
        await semaphore.acquire()
        return
    try:
        await asyncio.wait_for(semaphore.acquire(), settings.db_pool_timeout_seconds)
    except asyncio.TimeoutError:
        raise Unavailable(
            f"every database connection of this server is busy; try again in {settings.db_retry_after_seconds} s",
            code="database_unavailable",
            retry_after=settings.db_retry_after_seconds,
        ) from None


@asynccontextmanager
async def _slot(request: Request, semaphore: asyncio.Semaphore):
    await _take(request, semaphore)
    try:
        yield
    finally:
        semaphore.release()


async def _open(request: Request, sessions) -> Session:
    await _take(request, request.app.state.db_slots)
    try:
        return sessions()  # no connection yet: the route's first query takes one, in its thread
    except BaseException:
        request.app.state.db_slots.release()
        raise


async def _finish(request: Request, session: Session) -> None:
    try:
        if session.in_transaction():  # a read-only route leaves its transaction open: roll back and release, off the event loop
            # a limiter of its own, as FastAPI does for its own exits: releasing must never wait for a busy thread pool
            await anyio.to_thread.run_sync(_close, session, abandon_on_cancel=False, limiter=anyio.CapacityLimiter(1))
        else:
            _close(session)
    finally:
        request.app.state.db_slots.release()


async def get_session(request: Request) -> AsyncIterator[Session]:
    session = await _open(request, request.app.state.sessions)
    try:
        yield session
    finally:
        await _finish(request, session)


def release(session: Session) -> None:
    """Give the session's connection back now, in the route's thread (its teardown then has nothing to do)."""
    _close(session)


def _close(session: Session) -> None:
    try:
        session.close()
    except Exception:  # the connection died with the database; the pool has already let it go
        pass


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]  # released when the route returns, not after a download
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


async def get_reads(request: Request) -> LoopReads:
    return request.app.state.reads


ReadsDep = Annotated[LoopReads, Depends(get_reads)]


def _authenticate(sessions, key: str) -> Tenant | None:
    with sessions() as session:  # its own short session, closed (connection released) before the route runs
        return keys_crud.authenticate(session, key=key)


async def get_current_tenant(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Tenant:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "missing_api_key", "send your API key as 'Authorization: Bearer <key>'", "Authorization", headers=challenge)
    state = request.app.state
    cache, key_hash = state.tenant_cache, hash_api_key(credentials.credentials)
    tenant = cache.get(key_hash) if cache is not None else None
    if tenant is None:
        async with _slot(request, state.key_lookup_slots):
            tenant = await anyio.to_thread.run_sync(_authenticate, state.sessions, credentials.credentials)
        if tenant is not None and cache is not None:
            cache[key_hash] = tenant
    if tenant is None:
        raise ApiError(
            401, "invalid_api_key", "the API key is unknown or revoked; create one with `qdpo keys create --tenant NAME`", "Authorization", headers=challenge
        )
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
