"""Endpoints a job would call must be public, unless the operator allows their network: checked by
the API when the job is created and by the worker on every connection (real Postgres, real worker)."""

from __future__ import annotations

import copy

import pytest
from chat_server import create_app, serve

from .conftest import TINY_JOB, _deployment, _teardown
from .helpers import error_of, raw
from .infra import wait_for

pytestmark = pytest.mark.service


@pytest.fixture
def http(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as client:
        yield client


def judge(base_url: str) -> dict:
    return {"eval": {"judge": {"kind": "openai", "model": "m", "base_url": base_url}}}


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (judge("http://169.254.169.254/latest"), "eval.judge.base_url", "link-local"),
        (judge("http://localhost:8001/v1"), "eval.judge.base_url", "loopback"),
        (judge("http://2130706433:8001/v1"), "eval.judge.base_url", "loopback"),
        (judge("http://[::1]:8001/v1"), "eval.judge.base_url", "loopback"),
        (judge("https://10.0.0.7/v1"), "eval.judge.base_url", "private"),
        (judge("http://[::ffff:192.168.1.1]/v1"), "eval.judge.base_url", "private"),
        (
            {"method": {"type": "rlaif", "rlaif": {"labeler": {"kind": "openai", "model": "m", "base_url": "http://172.17.0.1:8000/v1"}}}},
            "method.rlaif.labeler.base_url",
            "private",
        ),
        (
            {"method": {"type": "factuality", "factuality": {"labeler": {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1/v1"}}}},
            "method.factuality.labeler.base_url",
            "loopback",
        ),
    ],
)
def test_an_endpoint_on_a_private_network_is_refused_at_creation(http, body, param, fragment):
    before = http.get("/v1/jobs").json()["data"]
    error = error_of(http.post("/v1/jobs", json=body), 422)
    assert (error["code"], error["param"]) == ("url_not_allowed", param), error
    assert error["message"].startswith(param + ":") and fragment in error["message"] and "QDPO_OUTBOUND_ALLOWED_NETWORKS" in error["message"]
    assert http.get("/v1/jobs").json()["data"] == before


def test_an_endpoint_host_that_does_not_resolve_is_refused(http):
    error = error_of(http.post("/v1/jobs", json=judge("http://no-such-judge.invalid/v1")), 422)
    assert (error["code"], error["param"]) == ("url_unresolvable", "eval.judge.base_url")


def test_a_public_endpoint_is_accepted(http):
    response = http.post("/v1/jobs", json=judge("http://8.8.8.8/v1"))
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def internal_deployment(tmp_path_factory):
    deployment, cleanup = _deployment("internal", tmp_path_factory, {"outbound_allowed_networks": ["10.0.0.0/8", "127.0.0.0/8"]})
    yield deployment
    _teardown(cleanup)


def test_the_operator_can_allow_an_internal_network(internal_deployment):
    with raw(internal_deployment, internal_deployment.admin_key) as http:
        assert http.post("/v1/jobs", json=judge("http://10.0.0.7:8000/v1")).status_code == 201
        assert http.post("/v1/jobs", json=judge("http://127.0.0.1:8000/v1")).status_code == 201
        error = error_of(http.post("/v1/jobs", json=judge("http://192.168.0.2/v1")), 422)
        assert error["param"] == "eval.judge.base_url"


def test_the_worker_checks_the_address_it_connects_to(worker_deployment):
    """A job that got past the API (its host resolved elsewhere then) still cannot reach loopback from the worker."""
    from sqlalchemy import select

    from api.jobspec import build_spec  # the API's own validation, without its endpoint check
    from api.schemas.jobs import JobCreate
    from service.broker import JobQueue
    from service.crud import jobs as jobs_crud
    from service.dispatch import validate_and_queue
    from service.security import new_id
    from service.storage import ArtifactStore
    from service.tables import VALIDATING, Job, Tenant

    app = create_app(mode="rule")
    with serve(app) as base_url:
        body = copy.deepcopy(TINY_JOB)
        body["method"] = {"type": "rlaif", "hyperparameters": {"epochs": 1}, "rlaif": {"labeler": {"kind": "openai", "model": "m", "base_url": base_url}}}
        request = JobCreate.model_validate(body)
        spec, inputs = build_spec(request)
        settings = worker_deployment.settings
        with worker_deployment.sessions() as session:
            tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == f"tenant-{worker_deployment.name}"))
            job = Job(
                id=new_id("job"),
                tenant_id=tenant_id,
                status=VALIDATING,
                model="tiny",
                method="rlaif",
                spec=spec,
                inputs=inputs,
                request=request.model_dump(exclude_none=True),
            )
            jobs_crud.create_job(session, job=job)
            validate_and_queue(session, store=ArtifactStore(settings.resolved_artifact_dir), queue=JobQueue(settings), job=job)
        client = worker_deployment.client()
        finished = wait_for(lambda: (j := client.jobs.get(job.id)).status in ("failed", "succeeded") and j, 240, 0.5, what="the rlaif job to end")
    assert finished.status == "failed" and finished.attempts == 1, finished.error
    error = finished.error if isinstance(finished.error, dict) else finished.error.__dict__
    assert (error["code"], error["param"]) == ("url_not_allowed", "method.rlaif.labeler.base_url"), error
    assert "loopback" in error["message"]
    assert app.state.requests == []  # refused before any request was sent
