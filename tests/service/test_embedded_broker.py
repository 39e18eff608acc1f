"""The embedded broker (kombu's filesystem transport) against the real app and Postgres: a job
cancelled or deleted while queued takes its message with it, so the worker, which polls for one
message at a time, never drains stale messages before a new job's."""

from __future__ import annotations

import pytest

from .conftest import _deployment, _teardown
from .helpers import raw

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    deployment, cleanup = _deployment("fsbroker", tmp_path_factory, {"broker_url": None})
    assert deployment.settings.is_embedded_broker
    yield deployment
    _teardown(cleanup)


@pytest.fixture
def queue(embedded):
    from service.broker import JobQueue

    queue = JobQueue(embedded.settings)
    queue.purge()
    return queue


def waiting_jobs(queue) -> list[str]:
    return [args[0] for _task_id, args in queue.waiting_messages()]  # file names order by the millisecond: sort to compare


def test_cancelled_and_deleted_queued_jobs_take_their_messages_with_them(embedded, queue):
    with raw(embedded, embedded.admin_key) as http:
        ids = [http.post("/v1/jobs", json={"seed": n}).json()["id"] for n in range(30)]
        assert sorted(waiting_jobs(queue)) == sorted(ids)  # one message file per job
        for job_id in ids[:20]:
            assert http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        for job_id in ids[:5]:
            assert http.delete(f"/v1/jobs/{job_id}").status_code == 200
        assert sorted(waiting_jobs(queue)) == sorted(ids[20:])
        for job_id in ids[20:]:
            http.post(f"/v1/jobs/{job_id}/cancel")
        assert queue.waiting_messages() == []
        new = http.post("/v1/jobs", json={}).json()["id"]
    [(task_id, args)] = queue.waiting_messages()
    assert args == [new]
    with embedded.sessions() as session:
        from service.crud import jobs as jobs_crud

        assert jobs_crud.get_job_by_id(session, job_id=new).task_id == task_id


def test_a_message_sent_again_by_the_reconciler_goes_too(embedded, queue):
    from service.dispatch import enqueue

    with raw(embedded, embedded.admin_key) as http:
        job_id = http.post("/v1/jobs", json={}).json()["id"]
        with embedded.sessions() as session:  # a second message with another task id, as a re-enqueue makes
            from service.crud import jobs as jobs_crud

            enqueue(session, queue=queue, job=jobs_crud.get_job_by_id(session, job_id=job_id), reason="sent again")
        assert waiting_jobs(queue) == [job_id, job_id]
        http.post(f"/v1/jobs/{job_id}/cancel")
    assert queue.waiting_messages() == []


def test_the_worker_polls_the_folder_often(embedded):
    from service.broker import make_celery

    app = make_celery(embedded.settings)
    with app.connection_for_read() as connection:
        assert connection.transport.polling_interval <= 0.1
