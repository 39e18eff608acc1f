"""The worker's event spool against the real Postgres: what the pipeline reports while the database
is unreachable is kept in the job's work directory and written later, in order and once — also by
the job's next attempt when the worker died first, and also for an entry whose commit had landed
unseen before the worker died (its idempotency key keeps it from being written twice).
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from qdpo_core.events import Event

from .infra import PG_BASE_URL
from .test_outage import PostgresProxy

pytestmark = pytest.mark.service


@pytest.fixture
def proxied(api_deployment):
    upstream = make_url(PG_BASE_URL)
    proxy = PostgresProxy(upstream.host or "127.0.0.1", upstream.port or 5432)
    url = make_url(api_deployment.settings.resolved_database_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    yield proxy, url
    proxy.close()


def test_events_reported_during_an_outage_are_written_later_in_order_and_once(api, api_deployment, proxied, tmp_path):
    from service.crud import events as events_crud
    from service.db import DatabaseOptions
    from service.tables import Job, JobCheckpoint, JobEvent, JobMetric
    from worker.recorder import SPOOL_NAME, EventRecorder

    proxy, url = proxied
    options = DatabaseOptions(pool_size=2, max_overflow=0, connect_timeout=1, pool_timeout=5)
    job_id = api.jobs.create().id  # a queued job of its own (nobody runs it): the recorder writes its events
    with api_deployment.sessions() as session:
        job_pk, events_before = session.execute(select(Job.pk, Job.event_seq).where(Job.id == job_id)).one()

    first = EventRecorder(url, job_pk, "test-owner", str(tmp_path), options)
    first(Event(type="stage", stage="train", message="started"))  # the database is up: written at once
    assert not (tmp_path / SPOOL_NAME).exists()

    proxy.block()
    for step in (1, 2, 3):
        first(Event(type="metrics", stage="train", message=f"step {step}", step=step, total=3, data={"loss": 1.0 / step}))
    first(Event(type="checkpoint", stage="train", message="checkpoint at step 3", step=3, data={"metrics": {"kl": 0.5}, "is_best": True}))
    spooled = [json.loads(line)["entry"] for line in (tmp_path / SPOOL_NAME).read_text().splitlines()]
    assert [(e["type"], e["step"]) for e in spooled] == [("metrics", 1), ("metrics", 2), ("metrics", 3), ("checkpoint", 3)]
    del first  # the worker dies with four entries spooled
    proxy.unblock()

    # Its last commit had landed before it died, without it hearing back: the entry is in the database already.
    with api_deployment.sessions() as session:
        landed = spooled[0]
        events_crud.add_event(
            session, job_pk=job_pk, type="metrics", stage="train", message=landed["message"], step=1, total=3, data=landed["data"], key=landed["key"]
        )
        session.commit()

    EventRecorder(url, job_pk, "test-owner", str(tmp_path), options)  # the job's next attempt writes the leftovers first
    assert not (tmp_path / SPOOL_NAME).exists()
    with api_deployment.sessions() as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_pk == job_pk, JobEvent.seq > events_before).order_by(JobEvent.seq)).all()
        metrics = session.scalars(select(JobMetric.step).where(JobMetric.job_pk == job_pk).order_by(JobMetric.step)).all()
        checkpoints = session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_pk == job_pk)).all()
    assert [(e.type, e.step) for e in events] == [("stage", None), ("metrics", 1), ("metrics", 2), ("metrics", 3), ("checkpoint", 3)]
    assert [e.seq for e in events] == list(range(events_before + 1, events_before + 6))  # gap-free, nothing twice
    assert [e.idempotency_key for e in events[1:]] == [e["key"] for e in spooled]
    assert [e.created_at.isoformat() for e in events[2:]] == [e["at"] for e in spooled[1:]]  # when it happened, not when it was written
    assert metrics == [1, 2, 3]
    assert [(c.step, c.metrics, c.is_best) for c in checkpoints] == [(3, {"kl": 0.5}, True)]
    assert [e.id for e in api.jobs.events(job_id).data][-5:] == [f"evt_{n}" for n in range(events_before + 1, events_before + 6)]
