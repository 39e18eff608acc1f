"""Probes, metrics and the OpenAPI document."""

from __future__ import annotations

import httpx
import pytest

from .helpers import raw

pytestmark = pytest.mark.service


def test_liveness_and_readiness(api_deployment):
    from alembic.script import ScriptDirectory

    from service.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(api_deployment.settings.resolved_database_url)).get_current_head()
    with httpx.Client(base_url=api_deployment.base_url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": f"ok (schema {head})", "broker": "ok"}


def test_readiness_fails_when_the_broker_is_down(api_deployment):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.service.infra import free_port

    settings = api_deployment.settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready" and body["checks"]["database"].startswith("ok") and body["checks"]["broker"].startswith("unavailable")


def test_prometheus_metrics(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as client:
        client.post("/v1/jobs", json={})
        text = client.get("/metrics").text
    assert 'qdpo_jobs{status="queued"}' in text
    assert 'qdpo_http_requests_total{method="POST",route="/v1/jobs",status="201"}' in text
    assert 'qdpo_jobs_created_total{method="qdpo"}' in text


def test_openapi_documents_every_route_with_examples(api_deployment):
    spec = httpx.get(f"{api_deployment.base_url}/openapi.json").json()
    operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert len(operations) >= 18
    for path, method, op in operations:
        assert op.get("summary") and op.get("description"), (method, path)
        if path.startswith("/v1/"):
            assert "401" in op["responses"], (method, path)
    job_create = spec["components"]["schemas"]["JobCreate"]
    assert job_create["examples"][0]["method"]["type"] == "qdpo"
    beta = spec["components"]["schemas"]["Hyperparameters"]["properties"]["beta"]
    assert "Default: 0.1" in beta["description"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_a_served_app_leaves_its_start_up_objects_out_of_garbage_collections(api_deployment):
    # `qdpo api` / `qdpo serve` build their app with create_served_app: a full collection over everything
    # built at start-up paused the process 50-60 ms at a time under load; create_app freezes nothing.
    import gc

    from api.main import create_app, create_served_app

    before = gc.get_freeze_count()
    create_app(api_deployment.settings)
    assert gc.get_freeze_count() == before
    try:
        create_served_app(api_deployment.settings)
        frozen = gc.get_freeze_count() - before
    finally:
        gc.unfreeze()
    assert frozen > 50_000, frozen  # the modules, the app, its routes and schemas
