"""Writes what the pipeline reports into the database, as it happens — or later, but never loses it.

stage / log / metrics / checkpoint events become rows a client can page or stream; metrics and
checkpoints also go to their own tables (keyed by step, so a resumed run replaces the steps it
repeats); progress ticks only update the job's `progress` (at most twice a second: a progress bar
needs no more, and the database should not take a write per generated batch).

When the database cannot be reached, training goes on and what it reports waits in a spool: an
append-only file in the job's work directory (`EventSpool`), written before the pipeline moves on.
Once the database answers again the spooled entries are written in the order they happened, each
in its own transaction with the event's idempotency key, so an entry whose commit landed unseen
is not written twice; new events queue behind them until the spool is empty. The file lives in the
shared work directory: a worker that dies with entries still spooled leaves them to the job's next
attempt, which writes them before its own. Only the latest progress is kept (it is a state, not
history).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from qdpo_core.events import STAGES, Event
from service.crud import events as events_crud
from service.crud import jobs as jobs_crud
from service.db import DatabaseOptions, is_database_unavailable, session_scope
from service.tables import utcnow

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.5
SPOOL_NAME = "events.spool.jsonl"
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 15.0  # while the database is away, retry after 1 s, 2 s, 4 s … (not at every event: each try can wait a connect timeout)


class EventSpool:
    """Append-only JSONL of entries not yet in the database, and of the keys written since.

    A line is {"entry": {...}} when an entry is spooled and {"done": key} once it was written, so
    the file alone tells what is still pending, whatever happened to the process that wrote it.
    The file is removed once nothing in it is pending.
    """

    def __init__(self, path: Path):
        self.path = path
        self.pending: list[dict] = []
        if path.is_file():
            done, entries = set(), []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line torn by a crash mid-write: nothing after it was acknowledged
                    continue
                if "entry" in record:
                    entries.append(record["entry"])
                elif "done" in record:
                    done.add(record["done"])
            self.pending = [entry for entry in entries if entry["key"] not in done]
            if not self.pending:
                path.unlink(missing_ok=True)

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, entry: dict) -> None:
        self._append({"entry": entry})
        self.pending.append(entry)

    def done(self, entry: dict) -> None:
        self.pending.remove(entry)
        if self.pending:
            self._append({"done": entry["key"]})
        else:
            self.path.unlink(missing_ok=True)


class EventRecorder:
    def __init__(self, database_url: str, job_pk: int, owner: str, workdir: str | None = None, options: DatabaseOptions | None = None):
        self.database_url = database_url
        self.options = options
        self.workdir = workdir
        self.job_pk = job_pk
        self.owner = owner
        self.stage: str | None = None
        self.stage_started = time.monotonic()
        self.last_progress_write = 0.0
        self.progress: dict | None = None
        self.unwritten_progress: tuple[dict, str | None] | None = None
        self.retry_at, self.failures = 0.0, 0
        self.spool = EventSpool(Path(workdir) / SPOOL_NAME) if workdir else None
        if self.spool is not None and self.spool.pending:
            log.info("job %s: %d event(s) of an earlier attempt are still spooled; writing them first", job_pk, len(self.spool.pending))
            self.flush()

    def __call__(self, event: Event) -> None:
        try:
            self.record(event)
        except Exception:  # a bug in recording must not fail a training run (an outage is spooled, not raised)
            log.exception("could not record event %s", event)

    # --- events ------------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        if event.type == "progress":
            self._progress(event)
            return
        message = event.message.replace(self.workdir, "<workdir>") if self.workdir else event.message  # server paths are not the client's business
        entry = {
            "key": uuid.uuid4().hex,
            "at": utcnow().isoformat(),
            "type": event.type,
            "stage": event.stage,
            "message": message,
            "level": event.level,
            "step": event.step,
            "total": event.total,
            "data": _jsonable(event.data),
        }
        self._submit(entry)
        if event.type == "stage" and event.message == "started":
            self.stage, self.stage_started = event.stage, time.monotonic()
            self._write_progress(self._progress_dict(None, None, None), stage=event.stage)
        elif event.type == "metrics" and event.step is not None:
            self._progress(event)

    def _submit(self, entry: dict) -> None:
        if self.spool is not None and (self.spool.pending or time.monotonic() < self.retry_at):
            self.spool.add(entry)  # behind what is already waiting: order is kept
            self.flush()
            return
        try:
            self._write(entry)
        except Exception as exc:
            if self.spool is None or not is_database_unavailable(exc):
                raise
            self._unavailable(exc)
            self.spool.add(entry)
        else:
            self._available()

    def _unavailable(self, exc: BaseException) -> None:
        if self.failures == 0:
            log.warning("job %s: the database is unavailable (%s); keeping events in the spool until it is back", self.job_pk, str(exc).splitlines()[0][:200])
        self.retry_at = time.monotonic() + min(RETRY_MAX_S, RETRY_FIRST_S * 2**self.failures)
        self.failures += 1

    def _available(self) -> None:
        if self.failures:
            log.info("job %s: the database is back; writing the spooled events", self.job_pk)
        self.retry_at, self.failures = 0.0, 0

    def _write(self, entry: dict) -> None:
        """One entry in one transaction, idempotent by its key (an entry written before is left alone)."""
        try:
            with session_scope(self.database_url, self.options) as session:
                events_crud.add_event(
                    session,
                    job_pk=self.job_pk,
                    type=entry["type"],
                    stage=entry["stage"],
                    message=entry["message"],
                    level=entry["level"],
                    step=entry["step"],
                    total=entry["total"],
                    data=entry["data"],
                    key=entry["key"],
                    created_at=datetime.fromisoformat(entry["at"]),
                )
                data, step = entry["data"] or {}, entry["step"]
                if entry["type"] == "metrics" and step is not None:
                    events_crud.upsert_metric(session, job_pk=self.job_pk, step=step, total_steps=entry["total"], values=data)
                elif entry["type"] == "checkpoint" and step is not None:
                    events_crud.upsert_checkpoint(
                        session, job_pk=self.job_pk, step=step, path=data.get("path"), metrics=data.get("metrics") or {}, is_best=bool(data.get("is_best"))
                    )
        except IntegrityError:
            # the same key raced in (a commit that landed unseen, then a second writer): written once is what we want
            with session_scope(self.database_url, self.options) as session:
                if events_crud.seq_of_key(session, job_pk=self.job_pk, key=entry["key"]) is None:
                    raise

    def flush(self) -> bool:
        """Write what the spool holds, oldest first; True once nothing is left unwritten."""
        if self.spool is not None:
            if self.spool.pending and time.monotonic() < self.retry_at:
                return False
            while self.spool.pending:
                entry = self.spool.pending[0]
                try:
                    self._write(entry)
                    self._available()
                except Exception as exc:
                    if is_database_unavailable(exc):
                        self._unavailable(exc)
                        return False
                    log.exception("job %s: dropping spooled event %s that the database refuses", self.job_pk, entry)
                self.spool.done(entry)
        if self.unwritten_progress is not None:
            progress, stage = self.unwritten_progress
            self._write_progress(progress, stage)
            return self.unwritten_progress is None
        return True

    def drain(self, timeout: float) -> bool:
        """Flush, retrying while the database is away, for at most `timeout` seconds (before the job's result is recorded)."""
        deadline = time.monotonic() + timeout
        while not self.flush():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(max(0.05, self.retry_at - time.monotonic()), max(0.0, deadline - time.monotonic())))
        return True

    @property
    def pending(self) -> int:
        return len(self.spool.pending) if self.spool is not None else 0

    # --- progress ----------------------------------------------------------------------------

    def _progress(self, event: Event) -> None:
        if event.stage and event.stage != self.stage:
            self.stage, self.stage_started = event.stage, time.monotonic()
        eta = (event.data or {}).get("eta_seconds")
        if eta is None and event.step and event.total:
            elapsed = time.monotonic() - self.stage_started
            eta = round(elapsed / event.step * (event.total - event.step), 1)
        progress = self._progress_dict(event.step, event.total, eta)
        now = time.monotonic()
        if now - self.last_progress_write >= PROGRESS_INTERVAL_S or (event.total and event.step == event.total):
            self._write_progress(progress, stage=self.stage)

    def _progress_dict(self, step, total, eta) -> dict:
        index = STAGES.index(self.stage) + 1 if self.stage in STAGES else None
        return {"stage": self.stage, "stage_index": index, "stage_count": len(STAGES), "step": step, "total_steps": total, "eta_seconds": eta}

    def _write_progress(self, progress: dict, stage: str | None) -> None:
        self.progress, self.last_progress_write = progress, time.monotonic()
        if stage is None and self.unwritten_progress is not None:
            stage = self.unwritten_progress[1]  # a stage change not yet written is still to be written
        if self.pending or time.monotonic() < self.retry_at:  # after the events it follows
            self.unwritten_progress = (progress, stage)
            return
        try:
            with session_scope(self.database_url, self.options) as session:
                jobs_crud.update_progress(session, job_pk=self.job_pk, owner=self.owner, stage=stage, progress=progress)
        except Exception as exc:
            if not is_database_unavailable(exc):
                raise
            self._unavailable(exc)
            self.unwritten_progress = (progress, stage)
        else:
            self._available()
            self.unwritten_progress = None


def _jsonable(value):
    """Event data may hold numpy/torch scalars or paths; the JSON column needs plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except Exception:
            pass
    return str(value)
