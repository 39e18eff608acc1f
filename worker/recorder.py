"""Writes what the pipeline reports into the database, as it happens.

stage / log / metrics / checkpoint events become rows a client can page or stream; metrics and
checkpoints also go to their own tables (keyed by step, so a resumed run replaces the steps it
repeats); progress ticks only update the job's `progress` (at most twice a second: a progress bar
needs no more, and the database should not take a write per generated batch).
"""

from __future__ import annotations

import logging
import time

from qdpo_core.events import STAGES, Event
from service.crud import events as events_crud
from service.crud import jobs as jobs_crud
from service.db import session_scope

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.5


class EventRecorder:
    def __init__(self, database_url: str, job_pk: int, owner: str, workdir: str | None = None):
        self.database_url = database_url
        self.workdir = workdir
        self.job_pk = job_pk
        self.owner = owner
        self.stage: str | None = None
        self.stage_started = time.monotonic()
        self.last_progress_write = 0.0
        self.progress: dict | None = None

    def __call__(self, event: Event) -> None:
        try:
            self.record(event)
        except Exception:  # losing one event must not fail a training run
            log.exception("could not record event %s", event)

    def record(self, event: Event) -> None:
        if event.type == "progress":
            self._progress(event)
            return
        message = event.message.replace(self.workdir, "<workdir>") if self.workdir else event.message  # server paths are not the client's business
        with session_scope(self.database_url) as session:
            events_crud.add_event(
                session,
                job_pk=self.job_pk,
                type=event.type,
                stage=event.stage,
                message=message,
                level=event.level,
                step=event.step,
                total=event.total,
                data=_jsonable(event.data),
            )
            if event.type == "metrics" and event.step is not None:
                events_crud.upsert_metric(session, job_pk=self.job_pk, step=event.step, total_steps=event.total, values=_jsonable(event.data))
            elif event.type == "checkpoint" and event.step is not None:
                data = event.data or {}
                events_crud.upsert_checkpoint(
                    session,
                    job_pk=self.job_pk,
                    step=event.step,
                    path=data.get("path"),
                    metrics=_jsonable(data.get("metrics") or {}),
                    is_best=bool(data.get("is_best")),
                )
        if event.type == "stage" and event.message == "started":
            self.stage, self.stage_started = event.stage, time.monotonic()
            self._write_progress(self._progress_dict(None, None, None), stage=event.stage)
        elif event.type == "metrics" and event.step is not None:
            self._progress(event)

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
        with session_scope(self.database_url) as session:
            jobs_crud.update_progress(session, job_pk=self.job_pk, owner=self.owner, stage=stage, progress=progress)


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
