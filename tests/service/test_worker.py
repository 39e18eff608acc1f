"""Jobs run by a real Celery worker process on the real Redis and Postgres, through the API.

Each job runs the whole qdpo_core pipeline on a tiny random Llama, so these tests cover the
worker's claim / lease / event recording / archive path and the pipeline's real outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json

import httpx
import pytest

from qdpo_client import ConflictError
from qdpo_core.events import STAGES

from .conftest import TINY_JOB
from .helpers import PROMPTS, write_jsonl
from .infra import wait_for

pytestmark = pytest.mark.service
JOB_TIMEOUT = 240


def tiny_job(**hyperparameters) -> dict:
    body = copy.deepcopy(TINY_JOB)
    body["method"]["hyperparameters"].update(hyperparameters)
    return body


def messages(client, job_id: str) -> list[str]:
    events, cursor = [], None
    while True:
        page = client.jobs.events(job_id, after=cursor, limit=1000)
        events += page.data
        if not page.has_more:
            return [e.message for e in events]
        cursor = page.next_cursor


def wait_status(client, job_id: str, statuses: tuple[str, ...], timeout: float = JOB_TIMEOUT):
    return wait_for(lambda: (job := client.jobs.get(job_id)).status in statuses and job, timeout, 0.3, what=f"{job_id} to reach {statuses}")


def test_a_job_runs_end_to_end(worker_deployment, tmp_path):
    client = worker_deployment.client()
    prompts = client.files.upload(write_jsonl(tmp_path / "prompts.jsonl", *PROMPTS), "prompts")
    held_out = client.files.upload(write_jsonl(tmp_path / "held_out.jsonl", *PROMPTS[:3]), "prompts")
    body = tiny_job(checkpoint_every=1)
    body["dataset"] = {"file_id": prompts.id, "eval_file_id": held_out.id}
    job = client.jobs.create(**body, suffix="e2e", metadata={"suite": "service"})
    # the answer shows the job as it is when the answer is written: on a busy machine the worker may have
    # taken it already (the status events below show it was queued first)
    assert job.status in ("queued", "running")

    streamed = list(client.jobs.stream_events(job.id))  # live SSE until the job ends

    job = client.jobs.get(job.id)
    assert job.status == "succeeded", job.error
    assert (job.attempts, job.progress.stage, job.error) == (1, "export", None)
    assert job.fine_tuned_model == f"tiny:qdpo-rtn2bit:e2e:{job.id}" and job.metadata == {"suite": "service"}
    assert job.started_at <= job.finished_at

    stages = [(e.stage, e.message) for e in streamed if e.type == "stage"]
    assert stages == [(stage, edge) for stage in STAGES for edge in ("started", "finished")]
    status = [e.message for e in streamed if e.type == "status"]
    assert status[:3] == ["job created; checking its input files", "queued", "running (attempt 1)"] and status[-1].startswith("succeeded")
    assert not any(str(worker_deployment.settings.resolved_artifact_dir) in e.message for e in streamed)  # no server paths leak

    metrics = client.jobs.metrics(job.id)
    assert [m.step for m in metrics] == [1, 2] and {m.total_steps for m in metrics} == {2}
    for metric in metrics:
        assert {"loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy", "learning_rate", "epoch"} <= set(metric.values)

    report = client.jobs.report(job.id)
    assert {"fp", "ptq", "aligned", "gap_closed", "selected_checkpoint"} <= set(report)
    assert report["eval_prompts"] == 3 and report["model"] == "tiny"
    assert client.jobs.report(job.id, markdown=True).startswith("# qdpo report")

    checkpoints = client.jobs.checkpoints(job.id)
    assert [c.step for c in checkpoints] == [1, 2]
    assert all({"kl", "token_flip_rate"} <= set(c.metrics) for c in checkpoints)
    assert [c.step for c in checkpoints if c.is_best] == ([report["selected_checkpoint"]] if report["selected_checkpoint"] else [])

    out = client.jobs.download_adapter(job.id, tmp_path / "download")
    archive = tmp_path / "download" / f"{job.id}-adapter.tar.gz"
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == job.adapter.sha256 and archive.stat().st_size == job.adapter.bytes
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "manifest.json", "report.json", "report.md"} <= {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"]["name"] == "tiny" and manifest["method"] == "qdpo" and manifest["quantization"]["bits"] == 2

    head = httpx.head(f"{worker_deployment.base_url}/v1/jobs/{job.id}/adapter", headers={"Authorization": f"Bearer {worker_deployment.admin_key}"})
    assert int(head.headers["content-length"]) == job.adapter.bytes and head.headers["etag"] == f'"{job.adapter.sha256}"'

    with pytest.raises(ConflictError) as finished:
        client.jobs.cancel(job.id)
    assert finished.value.code == "job_finished"
    job_dir = worker_deployment.settings.resolved_artifact_dir / "jobs"
    assert any(job_dir.rglob(f"{job.id}/adapter.tar.gz"))
    client.jobs.delete(job.id)
    assert not any(job_dir.rglob(job.id))


def test_a_user_error_fails_the_job_at_once_with_an_actionable_message(worker_deployment):
    client = worker_deployment.client()
    job = client.jobs.create(**{**tiny_job(), "model": "ghost"})  # registered, but its directory is gone
    job = wait_status(client, job.id, ("failed", "succeeded"))
    assert job.status == "failed" and job.attempts == 1  # not retried: it would fail the same way
    assert (job.error["code"], job.error["param"]) == ("model_unavailable", "model")
    assert job.error["message"].startswith("model: ")


def test_cancel_a_running_job(worker_deployment):
    client = worker_deployment.client()
    job = client.jobs.create(**tiny_job(epochs=20, batch_size=1))  # far longer than the test waits
    wait_for(lambda: client.jobs.get(job.id).stage in ("pairs", "baseline", "train"), JOB_TIMEOUT, 0.2, what="the job to be running")
    cancelling = client.jobs.cancel(job.id)
    assert cancelling.status == "cancelling" and cancelling.cancel_requested
    job = wait_status(client, job.id, ("cancelled", "failed", "succeeded"), timeout=60)
    assert job.status == "cancelled" and job.finished_at is not None
    log = messages(client, job.id)
    assert "cancel requested; the worker stops at the next step" in log
    assert log[-1].startswith("cancelled; the work finished so far is kept")


def _insert_without_message(deployment, body: dict) -> str:
    """A committed, queued job whose message never reached the broker (the API died in between)."""
    from api.jobspec import build_spec
    from api.schemas.jobs import JobCreate
    from service.crud import jobs as jobs_crud
    from service.security import new_id
    from service.tables import Job, Tenant

    spec, inputs = build_spec(JobCreate.model_validate(body))
    with deployment.sessions() as session:
        tenant = session.query(Tenant).filter_by(name="tenant-worker").one()
        job = Job(id=new_id("job"), tenant_id=tenant.id, status="queued", model=body["model"], method=spec["method"], spec=spec, inputs=inputs, request=body)
        jobs_crud.create_job(session, job=job)
        return job.id


def test_the_reconciler_sends_a_job_whose_message_was_lost(worker_deployment):
    client = worker_deployment.client()
    job_id = _insert_without_message(worker_deployment, tiny_job(epochs=20, batch_size=1))
    # Nobody enqueues it; the API's reconciler notices within requeue_after_seconds (3 s here).
    job = wait_status(client, job_id, ("running", "succeeded", "failed"), timeout=60)
    assert job.status == "running" and job.attempts == 1
    assert "sent to the broker again: its message was lost" in messages(client, job_id)
    client.jobs.cancel(job_id)
    assert wait_status(client, job_id, ("cancelled", "failed", "succeeded"), timeout=60).status == "cancelled"


def test_a_job_whose_worker_died_resumes_from_its_last_checkpoint(worker_deployment):
    client = worker_deployment.client()
    job = client.jobs.create(**tiny_job(epochs=2, batch_size=2, checkpoint_every=1, early_stopping_patience=0))
    wait_for(lambda: len(client.jobs.checkpoints(job.id)) >= 2, JOB_TIMEOUT, 0.2, what="two checkpoints")
    worker_deployment.worker.kill()  # SIGKILL: no cleanup, no acknowledgement, the lease just stops
    assert client.jobs.get(job.id).status == "running"
    worker_deployment.restart_worker()

    job = wait_status(client, job.id, ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    log = messages(client, job.id)
    assert any("stopped renewing its lease; re-queued to resume from the last checkpoint" in m for m in log)
    resumed = [m for m in log if m.startswith("resuming training from checkpoint at step ")]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 2  # finished steps were not redone
    assert [m.step for m in client.jobs.metrics(job.id)] == list(range(1, 9))  # one row per step, replays replaced
    assert client.jobs.download_adapter(job.id, worker_deployment.settings.var_dir / "resumed").is_dir()


def test_an_internal_error_is_retried_then_fails_with_the_last_error(worker_deployment):
    from service.broker import JobQueue
    from service.storage import ArtifactStore

    client = worker_deployment.client()
    job_id = _insert_without_message(worker_deployment, tiny_job())
    with worker_deployment.sessions() as session:
        from service.tables import Job

        tenant_id = session.query(Job).filter_by(id=job_id).one().tenant_id
    # A plain file where the job's work directory belongs: every run fails the same infrastructure way.
    workdir = ArtifactStore(worker_deployment.settings.resolved_artifact_dir).workdir(tenant_id, job_id)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    workdir.write_text("in the way")
    JobQueue(worker_deployment.settings).enqueue(job_id)

    job = wait_status(client, job_id, ("failed", "succeeded"), timeout=120)
    attempts = worker_deployment.settings.max_attempts
    assert job.status == "failed" and job.attempts == attempts, messages(client, job_id)
    assert job.error["code"] == "internal_error" and "FileExistsError" in job.error["message"]
    log = messages(client, job_id)
    assert sum(m.startswith("attempt ") and "retrying in" in m for m in log) == attempts - 1
