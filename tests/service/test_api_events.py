"""Event ids count per job: every job's first event is evt_1, whatever other tenants did."""

from __future__ import annotations

import threading

import pytest

from .helpers import raw

pytestmark = pytest.mark.service


def test_every_job_numbers_its_own_events_from_one(api_deployment):
    other, mine = api_deployment.new_key("busy-tenant"), api_deployment.new_key("new-tenant")
    with raw(api_deployment, other) as busy:
        for _ in range(3):  # someone else's activity must not show in my ids
            busy.post(f"/v1/jobs/{busy.post('/v1/jobs', json={}).json()['id']}/cancel")
    with raw(api_deployment, mine) as http:
        first, second = (http.post("/v1/jobs", json={}).json()["id"] for _ in range(2))
        http.post(f"/v1/jobs/{first}/cancel")
        events = http.get(f"/v1/jobs/{first}/events").json()["data"]
        assert [e["id"] for e in events] == ["evt_1", "evt_2", "evt_3"]
        assert [e["id"] for e in http.get(f"/v1/jobs/{second}/events").json()["data"]] == ["evt_1", "evt_2"]
        after = http.get(f"/v1/jobs/{first}/events", params={"after": "evt_1"}).json()["data"]
        assert [e["id"] for e in after] == ["evt_2", "evt_3"]
        headers = {"Accept": "text/event-stream", "Last-Event-ID": "evt_2"}
        with http.stream("GET", f"/v1/jobs/{first}/events", headers=headers) as response:
            text = "".join(response.iter_text())
        assert "id: evt_3" in text and "id: evt_1" not in text and "id: evt_2" not in text


def test_concurrent_writers_get_distinct_gap_free_numbers(api_deployment, tenant_key):
    from sqlalchemy import select

    from service.crud import events as events_crud
    from service.crud import jobs as jobs_crud
    from service.tables import Job, JobEvent

    with raw(api_deployment, tenant_key) as http:
        job_id = http.post("/v1/jobs", json={}).json()["id"]
    with api_deployment.sessions() as session:
        job_pk = jobs_crud.get_job_by_id(session, job_id=job_id).pk
    numbers, errors = [], []

    def write(n: int) -> None:
        try:
            for i in range(10):
                with api_deployment.sessions() as session:
                    numbers.append(events_crud.add_event(session, job_pk=job_pk, type="log", stage=None, message=f"writer {n} event {i}"))
                    session.commit()
        except Exception as exc:  # collected: an assertion in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    with api_deployment.sessions() as session:
        seqs = list(session.scalars(select(JobEvent.seq).where(JobEvent.job_pk == job_pk).order_by(JobEvent.seq)))
        counter = session.get(Job, job_pk).event_seq
    assert seqs == list(range(1, 63)) and counter == 62  # 2 lifecycle events + 60 written at once
    assert sorted(numbers) == list(range(3, 63))


def test_an_event_for_a_deleted_job_is_dropped_quietly(api_deployment, tenant_key):
    from service.crud import events as events_crud

    with api_deployment.sessions() as session:
        assert events_crud.add_event(session, job_pk=2**31 - 1, type="log", stage=None, message="nobody") is None
        session.commit()


def test_event_text_a_database_cannot_store_is_made_storable(api_deployment, tenant_key):
    # a labeler's reply quoted in an event may carry NUL or a lone surrogate; the write must not fail
    from service.crud import events as events_crud
    from service.crud import jobs as jobs_crud

    with raw(api_deployment, tenant_key) as http:
        job_id = http.post("/v1/jobs", json={}).json()["id"]
        with api_deployment.sessions() as session:
            job_pk = jobs_crud.get_job_by_id(session, job_id=job_id).pk
            events_crud.add_event(session, job_pk=job_pk, type="log", stage=None, message="said \x00 and \ud800", data={"reply\x00": ["\ud800"]})
            session.commit()
        last = http.get(f"/v1/jobs/{job_id}/events").json()["data"][-1]
    assert last["message"] == "said \ufffd and \\ud800" and last["data"] == {"reply\ufffd": ["\\ud800"]}
