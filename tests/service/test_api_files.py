"""/v1/files against the real Postgres: validation with line reports, size limit, tenancy, delete."""

from __future__ import annotations

import hashlib

import pytest

from .helpers import PREFERENCES_OPENAI, PREFERENCES_TRL, PROMPTS, error_of, jsonl, raw, upload

pytestmark = pytest.mark.service


@pytest.fixture
def http(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as client:
        yield client


def test_upload_validates_and_stores_a_prompts_file(http, api_deployment):
    content = jsonl(*PROMPTS)
    created = upload(http, content, filename="prompts.jsonl")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"].startswith("file_") and body["object"] == "file"
    assert (body["purpose"], body["filename"], body["bytes"], body["rows"], body["status"]) == ("prompts", "prompts.jsonl", len(content), 8, "processed")
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert http.get(f"/v1/files/{body['id']}").json() == body
    downloaded = http.get(f"/v1/files/{body['id']}/content")
    assert downloaded.status_code == 200 and downloaded.content == content


@pytest.mark.parametrize("records", [PREFERENCES_TRL, PREFERENCES_OPENAI], ids=["trl", "openai"])
def test_both_preference_formats_are_accepted(http, records):
    response = upload(http, jsonl(*records), purpose="preferences")
    assert response.status_code == 201, response.text
    assert response.json()["rows"] == 1


def test_an_invalid_file_is_rejected_whole_with_every_bad_line(http, api_deployment):
    before = http.get("/v1/files").json()["data"]
    staged_before = sorted((api_deployment.settings.resolved_artifact_dir).rglob("*.jsonl"))
    content = jsonl({"prompt": "fine"}, {"promt": "typo"}, "not json", {"messages": [{"role": "robot", "content": "x"}]}, {"prompt": "also fine"})
    error = error_of(upload(http, content), 422)
    assert error["code"] == "invalid_file" and error["param"] == "file"
    assert error["message"].startswith("file: line 2: field 'prompt' is missing")
    assert [(line["line"], line["field"]) for line in error["lines"]] == [(2, "prompt"), (3, None), (4, "messages[0].role")]
    assert http.get("/v1/files").json()["data"] == before  # nothing half-imported
    assert sorted(api_deployment.settings.resolved_artifact_dir.rglob("*.jsonl")) == staged_before


def test_a_preference_pair_uploaded_as_prompts_is_explained(http):
    error = error_of(upload(http, jsonl(*PREFERENCES_TRL), purpose="prompts"), 422)
    assert "purpose 'preferences'" in error["message"] and error["lines"][0]["field"] == "chosen"


def test_empty_file_is_rejected(http):
    error = error_of(upload(http, b"\n\n"), 422)
    assert error["code"] == "invalid_file" and "no records" in error["message"]


def test_file_over_the_size_limit_gets_413(http, api_deployment):
    limit = api_deployment.settings.max_upload_bytes
    line = jsonl({"prompt": "x" * 200})
    content = line * (limit // len(line) + 5)
    error = error_of(upload(http, content), 413)
    assert error["code"] == "file_too_large" and error["param"] == "file" and f"{limit:,}" in error["message"]
    # far over the limit: refused from the Content-Length alone
    error = error_of(upload(http, content * 40), 413)
    assert error["code"] == "file_too_large"


@pytest.mark.parametrize(
    ("data", "files", "param"),
    [
        ({"purpose": "training"}, {"file": ("a.jsonl", b'{"prompt": "x"}\n')}, "purpose"),
        ({}, {"file": ("a.jsonl", b'{"prompt": "x"}\n')}, "purpose"),
        ({"purpose": "prompts"}, None, "file"),
    ],
    ids=["unknown-purpose", "missing-purpose", "missing-file"],
)
def test_malformed_upload_requests_name_the_field(http, data, files, param):
    error = error_of(http.post("/v1/files", data=data, files=files), 422)
    assert error["param"] == param and error["message"].startswith(param)


def test_list_pages_with_a_cursor_and_filters_by_purpose(http):
    ids = [upload(http, jsonl(*PROMPTS)).json()["id"] for _ in range(3)]
    preference_id = upload(http, jsonl(*PREFERENCES_TRL), purpose="preferences").json()["id"]
    first = http.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == [preference_id, ids[2]] and first["has_more"]
    second = http.get("/v1/files", params={"limit": 2, "after": first["next_cursor"]}).json()
    assert [f["id"] for f in second["data"]] == [ids[1], ids[0]] and not second["has_more"]
    prompts_only = http.get("/v1/files", params={"purpose": "prompts"}).json()["data"]
    assert [f["id"] for f in prompts_only] == ids[::-1]
    assert error_of(http.get("/v1/files", params={"limit": 0}), 422)["param"] == "limit"
    assert error_of(http.get("/v1/files", params={"after": "file_nope"}), 422)["param"] == "after"


def test_delete_removes_row_and_content(http, api_deployment):
    file_id = upload(http, jsonl(*PROMPTS)).json()["id"]
    stored = list(api_deployment.settings.resolved_artifact_dir.rglob(f"{file_id}.jsonl"))
    assert len(stored) == 1
    assert http.delete(f"/v1/files/{file_id}").json() == {"id": file_id, "object": "file", "deleted": True}
    assert not stored[0].exists()
    for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
        error = error_of(http.get(path), 404)
        assert error["code"] == "file_not_found" and error["param"] == "file_id"
    assert error_of(http.delete(f"/v1/files/{file_id}"), 404)["code"] == "file_not_found"


def test_a_file_an_unfinished_job_reads_cannot_be_deleted(http):
    file_id = upload(http, jsonl(*PROMPTS)).json()["id"]
    job = http.post("/v1/jobs", json={"dataset": {"file_id": file_id}}).json()
    error = error_of(http.delete(f"/v1/files/{file_id}"), 409)
    assert error["code"] == "file_in_use" and job["id"] in error["message"]
    http.post(f"/v1/jobs/{job['id']}/cancel")
    assert http.delete(f"/v1/files/{file_id}").status_code == 200
