"""API keys and tenant isolation: another tenant's ids answer exactly like ids that never existed."""

from __future__ import annotations

import secrets
import time

import pytest

from .helpers import PROMPTS, error_of, jsonl, raw, upload
from .infra import wait_for

pytestmark = pytest.mark.service


@pytest.fixture
def two_tenants(api_deployment):
    a, b = (api_deployment.new_key(f"tenant-{secrets.token_hex(4)}") for _ in range(2))
    with raw(api_deployment, a) as alice, raw(api_deployment, b) as bob:
        yield alice, bob


def test_requests_without_a_valid_key_get_401(api_deployment, tenant_key):
    with raw(api_deployment, "qdpo_sk_not-a-real-key") as stranger:
        error = error_of(stranger.get("/v1/jobs"), 401)
        assert (error["code"], error["param"]) == ("invalid_api_key", "Authorization")
    with raw(api_deployment, tenant_key) as client:
        client.headers.pop("Authorization")
        response = client.get("/v1/files")
        assert error_of(response, 401)["code"] == "missing_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_a_revoked_key_stops_working(api_deployment):
    from service.crud import keys as keys_crud
    from service.db import session_factory

    with session_factory(api_deployment.settings.resolved_database_url)() as session:
        record, key = keys_crud.create_key(session, tenant_name=f"revoked-{secrets.token_hex(3)}")
    with raw(api_deployment, key) as client:
        assert client.get("/v1/jobs").status_code == 200
        with session_factory(api_deployment.settings.resolved_database_url)() as session:
            keys_crud.revoke_key(session, key_id=record.id)
        # An API process trusts a key it has checked for QDPO_API_KEY_CACHE_SECONDS; no longer than that.
        revoked = time.monotonic()
        wait_for(
            lambda: client.get("/v1/jobs").status_code == 401, api_deployment.settings.api_key_cache_seconds + 5, 0.2, what="the revoked key to be refused"
        )
        assert time.monotonic() - revoked <= api_deployment.settings.api_key_cache_seconds + 1
        assert error_of(client.get("/v1/jobs"), 401)["code"] == "invalid_api_key"


def test_keys_are_stored_hashed(api_deployment):
    from sqlalchemy import select

    from service.db import session_factory
    from service.tables import ApiKey

    key = api_deployment.new_key(f"hashed-{secrets.token_hex(3)}")
    with session_factory(api_deployment.settings.resolved_database_url)() as session:
        stored = [(k.key_hash, k.key_prefix) for k in session.scalars(select(ApiKey))]
    assert all(key not in values for values in stored)
    assert any(key.startswith(prefix) for _, prefix in stored)


def test_tenants_cannot_see_or_touch_each_others_objects(two_tenants):
    alice, bob = two_tenants
    file_id = upload(alice, jsonl(*PROMPTS)).json()["id"]
    job_id = alice.post("/v1/jobs", json={"dataset": {"file_id": file_id}}).json()["id"]

    assert bob.get("/v1/files").json()["data"] == [] and bob.get("/v1/jobs").json()["data"] == []
    for method, path, kind in [
        ("GET", f"/v1/files/{file_id}", "file"),
        ("GET", f"/v1/files/{file_id}/content", "file"),
        ("DELETE", f"/v1/files/{file_id}", "file"),
        ("GET", f"/v1/jobs/{job_id}", "job"),
        ("POST", f"/v1/jobs/{job_id}/cancel", "job"),
        ("DELETE", f"/v1/jobs/{job_id}", "job"),
        ("GET", f"/v1/jobs/{job_id}/events", "job"),
        ("GET", f"/v1/jobs/{job_id}/metrics", "job"),
        ("GET", f"/v1/jobs/{job_id}/checkpoints", "job"),
        ("GET", f"/v1/jobs/{job_id}/report", "job"),
        ("GET", f"/v1/jobs/{job_id}/adapter", "job"),
    ]:
        theirs = error_of(bob.request(method, path), 404)
        missing = error_of(bob.request(method, path.replace(file_id if kind == "file" else job_id, f"{kind}_000000000000000000000000")), 404)
        assert theirs["code"] == missing["code"] == f"{kind}_not_found", (method, path)
    # Bob cannot build on Alice's file, nor page from her cursor.
    error = error_of(bob.post("/v1/jobs", json={"dataset": {"file_id": file_id}}), 404)
    assert error["param"] == "dataset.file_id"
    assert error_of(bob.get("/v1/jobs", params={"after": job_id}), 422)["code"] == "invalid_cursor"
    # Bob's attempts changed nothing for Alice.
    assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    assert alice.get(f"/v1/files/{file_id}").status_code == 200
