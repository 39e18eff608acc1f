"""Run one job end to end: claim it, run the pipeline, persist what it produces.

    claim (queued → running, lease) → build the spec from the row → run_pipeline(spec, workdir,
    on_event=recorder, should_cancel=lease) → archive the export → succeeded | failed | cancelled

The work directory lives in the shared artifact store and the pipeline resumes from it, so a
job that is run again (after a retry or a lost worker) continues where the last run stopped.
torch is imported here only when a job actually runs, never when the module is loaded.

A database outage while a job runs costs it nothing: the recorder spools what the pipeline reports,
the lease and the cancel poll try again later, and once the run is over its result (after every
spooled event) is written when the database answers again, for up to QDPO_DB_OUTAGE_WAIT_SECONDS
— rather than failing a finished attempt and running the job again.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass

from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_delay, wait_exponential

from qdpo_core import outbound
from qdpo_core.config import PipelineSpec
from qdpo_core.errors import Cancelled, QdpoError
from service.config import Settings
from service.crud import events as events_crud
from service.crud import jobs as jobs_crud
from service.db import is_database_unavailable, session_factory
from service.errors import ServiceError
from service.fields import api_message, api_param, fine_tuned_model_name
from service.inputs import resolve_inputs, spec_with_inputs
from service.storage import ArtifactStore
from service.tables import CANCELLED, FAILED, SUCCEEDED, Job
from worker.archive import build_archive
from worker.lease import Lease
from worker.recorder import EventRecorder

log = logging.getLogger(__name__)

# The block list: errors that would happen again on a retry. Everything else is retried.
NOT_RETRIED = (QdpoError, ServiceError, MemoryError)


@dataclass
class RetryLater(Exception):
    countdown: float


def user_error(exc: QdpoError) -> dict:
    """The pipeline's error with field names as the API client knows them."""
    error = exc.to_dict()
    error["message"] = api_message(exc.message, exc.param)
    error["param"] = api_param(exc.param)
    return error


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def out_of_memory_error(exc: BaseException) -> dict:
    return {
        "code": "out_of_memory",
        "message": f"the worker ran out of memory ({type(exc).__name__}); lower method.hyperparameters.batch_size, generation.batch_size or eval.batch_size, or use a smaller model",
        "param": "method.hyperparameters.batch_size",
    }


class JobRunner:
    def __init__(self, settings: Settings, job_id: str, task_id: str | None):
        self.settings, self.job_id, self.task_id = settings, job_id, task_id
        self.url = settings.resolved_database_url
        self.options = settings.database_options()
        self.sessions = session_factory(self.url, self.options)
        self.store = ArtifactStore(settings.resolved_artifact_dir)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{(task_id or 'manual')[:8]}"
        self.recorder: EventRecorder | None = None

    def _when_available(self, write, *args, **kwargs):
        """Run a database write, retrying while the database is unavailable (up to QDPO_DB_OUTAGE_WAIT_SECONDS)."""
        retrying = Retrying(
            retry=retry_if_exception(is_database_unavailable),
            wait=wait_exponential(multiplier=0.5, max=10),
            stop=stop_after_delay(self.settings.db_outage_wait_seconds),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        return retrying(write, *args, **kwargs)

    def _drain_events(self) -> None:
        """Every event the run reported is in the database before its result is (the result is the log's last word)."""
        if self.recorder is not None and not self.recorder.drain(self.settings.db_outage_wait_seconds):
            log.error(
                "job %s: %d event(s) are still spooled after %.0f s without a database; the next attempt writes them",
                self.job_id,
                self.recorder.pending,
                self.settings.db_outage_wait_seconds,
            )

    def run(self) -> str:
        """Returns what happened: skipped, succeeded, failed, cancelled or lost."""
        self.settings.register_models()
        outbound.set_policy(self.settings.outbound_policy())  # every labeler / judge client of this job checks where it connects
        with self.sessions() as session:
            job = jobs_crud.claim(session, job_id=self.job_id, owner=self.owner, lease_seconds=self.settings.lease_seconds, task_id=self.task_id)
        if job is None:
            log.info("job %s is not claimable (finished, cancelled, deleted or running elsewhere); message dropped", self.job_id)
            return "skipped"
        if job.cancel_requested:
            return self._finish(job, CANCELLED, "cancelled before it started")
        with Lease(self.url, job.pk, self.owner, self.settings.lease_seconds, self.settings.heartbeat_seconds, self.settings.cancel_poll_seconds) as lease:
            try:
                return self._execute(job, lease)
            except Cancelled:
                if lease.lost.is_set():
                    return "lost"
                return self._finish(job, CANCELLED, "cancelled; the work finished so far is kept until the job is deleted")
            except Exception as exc:  # anything after the claim ends the run properly; KeyboardInterrupt / SystemExit let the lease expire instead
                return self._failed(job, exc)

    def _execute(self, job: Job, lease: Lease) -> str:
        from qdpo_core.pipeline import run_pipeline  # torch arrives with the first job, not at import

        spec = self._spec(job)
        workdir = self.store.workdir(job.tenant_id, job.id)
        workdir.mkdir(parents=True, exist_ok=True)
        self.recorder = EventRecorder(self.url, job.pk, self.owner, str(workdir), self.options)
        result = run_pipeline(spec, workdir, on_event=self.recorder, should_cancel=lease.should_stop)
        return self._succeeded(job, result)

    def _spec(self, job: Job) -> PipelineSpec:
        with self.sessions() as session:
            paths = resolve_inputs(session, self.store, tenant_id=job.tenant_id, inputs=job.inputs or {})
        spec = spec_with_inputs(job.spec, paths)
        if self.settings.device != "auto":
            spec["model"] = {**spec["model"], "device": self.settings.device}
        return PipelineSpec.from_dict(spec)

    def _failed(self, job: Job, exc: Exception) -> str:
        if isinstance(exc, QdpoError):
            log.info("job %s failed: %s", job.id, exc)
            error = user_error(exc)
            return self._finish(job, FAILED, error["message"], error=error)
        if isinstance(exc, ServiceError):  # an input file vanished or changed: a retry would meet it again
            log.info("job %s failed: %s", job.id, exc)
            return self._finish(job, FAILED, exc.message, error=exc.to_dict())
        if _is_out_of_memory(exc):
            error = out_of_memory_error(exc)
            return self._finish(job, FAILED, error["message"], error=error)
        log.exception("job %s: internal error in attempt %s", job.id, job.attempts)
        if job.attempts < self.settings.max_attempts:
            countdown = self.settings.retry_backoff_seconds * 2 ** (job.attempts - 1)
            self._drain_events()
            released = self._when_available(
                self._release, job, f"attempt {job.attempts} failed ({type(exc).__name__}: {exc}); retrying in {countdown:.0f} s from the last checkpoint"
            )
            if released:
                raise RetryLater(countdown)
            return "lost"
        error = {"code": "internal_error", "message": f"the job failed {job.attempts} times; last error: {type(exc).__name__}: {exc}"[:2000], "param": None}
        return self._finish(job, FAILED, error["message"], error=error)

    def _release(self, job: Job, message: str) -> bool:
        with self.sessions() as session:
            return jobs_crud.release(session, job_pk=job.pk, owner=self.owner, message=message)

    def _succeeded(self, job: Job, result) -> str:
        relative = self.store.adapter_relpath(job.tenant_id, job.id)
        base = ((result.manifest or {}).get("gguf") or {}).get("base") or {}  # the quantized GGUF model: served on its own
        size, sha256 = build_archive(result.export_dir, self.store.absolute(relative), skip=(base["file"],) if base.get("included") else ())
        report_md = result.export_dir / "report.md"
        if report_md.is_file():
            shutil.copyfile(report_md, self.store.report_markdown(job.tenant_id, job.id))
        self._drain_events()
        self._when_available(self._mark_selected_checkpoint, job.pk, (result.report or {}).get("selected_checkpoint"))
        return self._finish(
            job,
            SUCCEEDED,
            f"succeeded; adapter {size:,} bytes, sha256 {sha256[:12]}…",
            report=result.report,
            adapter_path=relative,
            adapter_sha256=sha256,
            adapter_bytes=size,
            fine_tuned_model=fine_tuned_model_name(model=job.model, method=job.method, quantization=job.spec["quantization"], suffix=job.suffix, job_id=job.id),
        )

    def _mark_selected_checkpoint(self, job_pk: int, step: int | None) -> None:
        with self.sessions() as session:
            events_crud.mark_selected_checkpoint(session, job_pk=job_pk, step=step)
            session.commit()

    def _finish(self, job: Job, status: str, message: str, **values) -> str:
        level = "error" if status == FAILED else "info"
        self._drain_events()

        def finish() -> bool:
            with self.sessions() as session:
                return jobs_crud.finish(session, job_pk=job.pk, owner=self.owner, status=status, message=message, level=level, **values)

        done = self._when_available(finish)
        if not done:
            log.warning("job %s changed hands before it could be marked %s", job.id, status)
            return "lost"
        return status
