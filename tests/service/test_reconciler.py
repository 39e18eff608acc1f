"""The reconciler against the real Postgres and Redis: lost messages, expired leases, stuck jobs."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from service.tables import Job, utcnow

from .helpers import raw

pytestmark = pytest.mark.service


@pytest.fixture
def http(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as client:
        yield client


@pytest.fixture
def queue(api_deployment):
    from service.broker import JobQueue

    return JobQueue(api_deployment.settings)


def reconcile(deployment, queue, **kwargs):
    from service.reconciler import reconcile_once

    return reconcile_once(deployment.settings, queue, **kwargs)


def set_job(deployment, job_id: str, **values) -> None:
    with deployment.sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def messages(http, job_id: str) -> list[str]:
    return [e["message"] for e in http.get(f"/v1/jobs/{job_id}/events").json()["data"]]


def test_a_job_whose_message_was_lost_is_sent_again(http, api_deployment, queue):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    queue.purge()  # the broker lost every message (restart without persistence, say)
    assert queue.depth() == 0
    report = reconcile(api_deployment, queue, requeue_after_seconds=0)
    assert job_id in report.reenqueued_lost
    assert queue.depth() >= 1
    assert messages(http, job_id)[-1] == "sent to the broker again: its message was lost"
    # With its message back in the broker, the next pass leaves it alone.
    again = reconcile(api_deployment, queue, requeue_after_seconds=0)
    assert job_id not in again.reenqueued_lost


def test_a_recently_queued_job_is_not_duplicated(http, api_deployment, queue):
    queue.purge()
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    depth = queue.depth()
    report = reconcile(api_deployment, queue)  # the default wait: the job was queued just now
    assert job_id not in report.reenqueued_lost and queue.depth() == depth


def test_a_running_job_whose_lease_expired_is_requeued(http, api_deployment, queue):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    queue.purge()
    set_job(api_deployment, job_id, status="running", lease_owner="dead-host:1:abc", lease_expires_at=utcnow() - timedelta(seconds=5), attempts=1)
    report = reconcile(api_deployment, queue)
    assert report.requeued_expired == [job_id]
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempts"] == 1
    assert "dead-host:1:abc stopped renewing its lease; re-queued" in messages(http, job_id)[-1]
    assert queue.depth() == 1


def test_a_live_lease_is_left_alone(http, api_deployment, queue):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    set_job(api_deployment, job_id, status="running", lease_owner="busy-host:1:abc", lease_expires_at=utcnow() + timedelta(seconds=60), attempts=1)
    reconcile(api_deployment, queue, requeue_after_seconds=0)
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    set_job(api_deployment, job_id, status="cancelled", lease_owner=None, lease_expires_at=None)


def test_a_job_that_lost_its_worker_too_often_fails(http, api_deployment, queue):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    attempts = api_deployment.settings.max_attempts
    set_job(api_deployment, job_id, status="running", lease_owner="oom-host:9:xyz", lease_expires_at=utcnow() - timedelta(seconds=1), attempts=attempts)
    assert reconcile(api_deployment, queue).failed_expired == [job_id]
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost" and f"{attempts} times" in job["error"]["message"]


def test_a_job_being_cancelled_when_its_worker_died_ends_cancelled(http, api_deployment, queue):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    set_job(api_deployment, job_id, status="running", lease_owner="gone:1:a", lease_expires_at=utcnow() + timedelta(seconds=60), attempts=1)
    assert http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    set_job(api_deployment, job_id, lease_expires_at=utcnow() - timedelta(seconds=1))
    assert reconcile(api_deployment, queue).cancelled_expired == [job_id]
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_a_job_left_validating_by_a_crashed_api_is_queued(http, api_deployment, queue):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    set_job(api_deployment, job_id, status="validating", created_at=utcnow() - timedelta(minutes=10), enqueued_at=None)
    report = reconcile(api_deployment, queue)
    assert job_id in report.queued_validating
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_the_reconcile_command_runs_one_pass(api_deployment):
    import subprocess
    import sys

    from .infra import REPO

    result = subprocess.run([sys.executable, "-m", "qdpo_cli.main", "reconcile"], env=api_deployment.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ReconcileReport(")


def test_a_job_created_while_the_broker_is_down_is_queued_and_sent_later(api_deployment, tenant_key, queue):
    """The API answers 201 (the job is stored), records the job as never sent, and the reconciler sends it."""
    from api.main import create_app

    from .infra import LiveServer

    dead = api_deployment.settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})  # port 9: nothing listens
    server = LiveServer(create_app(dead)).start()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tenant_key}"}, timeout=60) as client:
            response = client.post("/v1/jobs", json={})
            assert response.status_code == 201, response.text
            job_id = response.json()["id"]
            assert response.json()["status"] == "queued"
    finally:
        server.stop()
    with api_deployment.sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None and (job.task_id, job.enqueued_at) == (None, None)  # never sent: the reconciler's to send
    with raw(api_deployment, tenant_key) as http:
        said = messages(http, job_id)
        assert said[:2] == ["job created", "queued"] and said[2].startswith("the broker is unreachable")
        queue.purge()  # the reconciler sends when the broker holds fewer messages than jobs wait
        report = reconcile(api_deployment, queue, requeue_after_seconds=0)
        assert job_id in report.reenqueued_lost
        assert messages(http, job_id)[-1] == "sent to the broker again: its message was lost"


def test_a_new_jobs_message_carries_the_task_id_recorded_with_it(api_deployment, tenant_key):
    """A job without input files is stored as queued with its message's id before the message is sent."""
    import json

    import redis

    with raw(api_deployment, tenant_key) as http:
        job_id = http.post("/v1/jobs", json={}).json()["id"]
    with api_deployment.sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None and job.status == "queued" and job.task_id and job.enqueued_at is not None
        task_id = job.task_id
    client = redis.Redis.from_url(api_deployment.settings.resolved_broker_url)
    try:
        bodies = [json.loads(m) for m in client.lrange(api_deployment.settings.queue_name, 0, -1)]
    finally:
        client.close()
    assert task_id in [b["headers"]["id"] for b in bodies if b["headers"].get("argsrepr") == repr([job_id])]
