"""Migrations upgrade a database that already holds data, on SQLite and on Postgres alike."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from service.crud import events as events_crud
from service.crud import jobs as jobs_crud
from service.db import make_engine
from service.errors import InvalidInput
from service.migrate import current_revision, upgrade

from .infra import create_database, drop_database

pytestmark = pytest.mark.service

NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)
REQUEST = {"seed": 1, "method": {"type": "qdpo", "hyperparameters": {"beta": 0.1, "learning_rate": 1e-4}}, "metadata": {"team": "é"}}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'qdpo.db'}"
        return
    name, url = create_database("qdpo_test_migrate")
    yield url
    drop_database(name)


def _seed_revision_0001(url: str) -> tuple[int, int]:
    """A tenant, two jobs (one created with an Idempotency-Key) and interleaved events, as 0001 stored them."""
    meta = sa.MetaData()
    tenants = sa.Table("tenants", meta, autoload_with=(engine := make_engine(url, pooled=False)))
    jobs = sa.Table("jobs", meta, autoload_with=engine)
    events = sa.Table("job_events", meta, autoload_with=engine)
    with engine.begin() as connection:
        connection.execute(tenants.insert().values(id="ten_1", name="acme", created_at=NOW))
        common = {
            "tenant_id": "ten_1",
            "status": "queued",
            "model": "m",
            "method": "qdpo",
            "spec": {},
            "inputs": {},
            "metadata": {},
            "created_at": NOW,
            "updated_at": NOW,
        }
        a = connection.execute(jobs.insert().values(id="job_a", request=REQUEST, idempotency_key="key-1", **common)).inserted_primary_key[0]
        b = connection.execute(jobs.insert().values(id="job_b", request={}, **common)).inserted_primary_key[0]
        for n, job_pk in enumerate([a, b, a, b, b], start=1):
            connection.execute(events.insert().values(job_pk=job_pk, created_at=NOW, type="status", level="info", message=f"event {n}", data={}))
    engine.dispose()
    return a, b


def test_upgrade_numbers_existing_events_per_job_and_fingerprints_keyed_requests(database_url):
    from service.tables import Job

    upgrade(database_url, "0001")
    a, b = _seed_revision_0001(database_url)
    upgrade(database_url)
    assert current_revision(database_url) == head_revision()
    engine = make_engine(database_url, pooled=False)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT job_pk, seq, message FROM job_events ORDER BY pk")).all()
        counters = dict(connection.execute(sa.text("SELECT pk, event_seq FROM jobs")).all())
        fingerprints = dict(connection.execute(sa.text("SELECT id, request_sha256 FROM jobs")).all())
    assert [(r.job_pk, r.seq) for r in rows] == [(a, 1), (b, 1), (a, 2), (b, 2), (b, 3)]
    assert counters == {a: 2, b: 3}
    assert fingerprints == {"job_a": jobs_crud.request_fingerprint(REQUEST), "job_b": None}
    # the upgraded database works as a new one: the next event continues the job's own numbering,
    # and the old job's key still recognises the request it was made with
    with sa.orm.Session(engine) as session:
        assert events_crud.add_event(session, job_pk=a, type="log", stage=None, message="after the upgrade") == 3
        session.commit()
        job_a = session.get(Job, a)
        jobs_crud.check_idempotent_reuse(job_a, key="key-1", request=REQUEST)
        with pytest.raises(InvalidInput) as info:
            jobs_crud.check_idempotent_reuse(job_a, key="key-1", request={**REQUEST, "seed": 2})
        assert info.value.code == "idempotency_key_reused" and "seed" in info.value.message
    engine.dispose()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from service.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_the_migrations_form_one_line():
    """Every revision follows the one before it: one head, one base, no branch (two changes numbered alike would make two heads)."""
    from alembic.script import ScriptDirectory

    from service.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1, f"more than one Alembic head: {script.get_heads()}; chain the newer migration after the other (down_revision)"
    assert len(script.get_bases()) == 1, script.get_bases()
    revisions = [r.revision for r in script.walk_revisions()]
    assert revisions == sorted(revisions, reverse=True), revisions  # numbered in the order they apply


def test_downgrade_and_upgrade_again(database_url):
    upgrade(database_url, "0001")
    _seed_revision_0001(database_url)
    upgrade(database_url)
    from alembic import command

    from service.migrate import alembic_config

    command.downgrade(alembic_config(database_url), "0001")
    assert current_revision(database_url) == "0001"
    engine = make_engine(database_url, pooled=False)
    with engine.connect() as connection:  # SQLite rebuilds tables to drop columns: no cascade may empty the event log
        assert connection.execute(sa.text("SELECT COUNT(*) FROM job_events")).scalar() == 5
    upgrade(database_url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT MAX(event_seq) FROM jobs")).scalar() == 3
    engine.dispose()
