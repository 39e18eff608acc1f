"""/v1/jobs against the real Postgres and Redis (no worker: jobs stay queued)."""

from __future__ import annotations

import pytest

from .helpers import PREFERENCES_TRL, PROMPTS, error_of, jsonl, raw, upload

pytestmark = pytest.mark.service


@pytest.fixture
def http(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as client:
        yield client


def test_create_fills_every_default_and_queues(http, api_deployment):
    from service.broker import JobQueue

    depth_before = JobQueue(api_deployment.settings).depth() or 0
    body = {
        "model": "smollm2-135m-instruct",
        "quantization": {"method": "rtn", "bits": 3, "group_size": 64},
        "method": {"type": "qdpo", "hyperparameters": {"beta": 0.2, "lora_rank": 8}},
        "suffix": "support-bot",
        "metadata": {"team": "search"},
        "seed": 7,
    }
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_") and job["object"] == "job" and job["status"] == "queued"
    assert job["quantization"] == {"method": "rtn", "bits": 3, "group_size": 64, "double_quant": False, "type": None}
    hyper = job["method"]["hyperparameters"]
    assert (job["method"]["type"], hyper["beta"], hyper["lora_rank"], hyper["lora_alpha"], hyper["loss"]) == ("qdpo", 0.2, 8, 16, "sigmoid")
    assert job["dataset"]["file_id"] is None and job["seed"] == 7
    assert (job["suffix"], job["metadata"], job["progress"], job["error"], job["adapter"]) == ("support-bot", {"team": "search"}, None, None, None)
    assert JobQueue(api_deployment.settings).depth() == depth_before + 1  # enqueued after the commit
    events = http.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events] == ["job created", "queued"]


def test_job_with_uploaded_files(http):
    prompts = upload(http, jsonl(*PROMPTS)).json()["id"]
    held_out = upload(http, jsonl(*PROMPTS[:2])).json()["id"]
    job = http.post("/v1/jobs", json={"dataset": {"file_id": prompts, "eval_file_id": held_out, "max_train_prompts": 4}}).json()
    assert (job["dataset"]["file_id"], job["dataset"]["eval_file_id"], job["dataset"]["max_train_prompts"]) == (prompts, held_out, 4)
    pairs = upload(http, jsonl(*PREFERENCES_TRL), purpose="preferences").json()["id"]
    dpo = http.post("/v1/jobs", json={"method": {"type": "dpo"}, "dataset": {"file_id": pairs}})
    assert dpo.status_code == 201 and dpo.json()["method"]["type"] == "dpo"


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"method": {"hyperparameters": {"beta": 20}}}, 422, "invalid_spec", "method.hyperparameters.beta"),
        ({"method": {"hyperparameters": {"beta": "high"}}}, 422, "invalid_request", "method.hyperparameters.beta"),
        ({"method": {"hyperparameters": {"betta": 0.1}}}, 422, "invalid_request", "method.hyperparameters.betta"),
        ({"method": {"hyperparameters": {"learning_rate": 1.0}}}, 422, "invalid_spec", "method.hyperparameters.learning_rate"),
        ({"method": {"hyperparameters": {"loss": "hinged"}}}, 422, "invalid_request", "method.hyperparameters.loss"),
        ({"method": {"type": "magic"}}, 422, "invalid_request", "method.type"),
        ({"method": {"type": "dpo"}}, 422, "invalid_spec", "dataset.file_id"),
        ({"method": {"type": "qdpo", "rlaif": {"temperature": 0.5}}}, 422, "invalid_spec", "method.rlaif"),
        ({"quantization": {"method": "nf4", "bits": 3}}, 422, "invalid_spec", "quantization.bits"),
        ({"quantization": {"method": "rtn", "bits": 5}}, 422, "invalid_spec", "quantization.bits"),
        ({"quantization": {"method": "none"}}, 422, "invalid_spec", "quantization.method"),
        ({"dataset": {"eval_fraction": 1.5}}, 422, "invalid_spec", "dataset.eval_fraction"),
        ({"generation": {"max_new_tokens": 0}}, 422, "invalid_spec", "generation.max_new_tokens"),
        ({"eval": {"judge": {"kind": "openai"}}}, 422, "invalid_spec", "eval.judge.base_url"),
        ({"model": "gpt-5"}, 422, "model_not_available", "model"),
        ({"model": "/etc"}, 422, "model_not_available", "model"),
        ({"seed": -1}, 422, "invalid_spec", "seed"),
        ({"suffix": "no spaces allowed"}, 422, "invalid_request", "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 422, "invalid_request", "metadata"),
        ({"unexpected": 1}, 422, "invalid_request", "unexpected"),
        ({"dataset": {"file_id": "file_doesnotexist"}}, 404, "file_not_found", "dataset.file_id"),
        ({"dataset": {"eval_file_id": "file_doesnotexist"}}, 404, "file_not_found", "dataset.eval_file_id"),
        ({"method": {"type": "rlaif", "rlaif": {"labeler": {"kind": "bogus"}}}}, 422, "invalid_request", "method.rlaif.labeler.kind"),
        ({"method": {"type": "rlaif", "rlaif": {"labeler": {"model": "/srv/private-model"}}}}, 422, "model_not_available", "method.rlaif.labeler.model"),
        ({"eval": {"judge": {"kind": "openai", "base_url": "http://x/v1", "api_key_env": "QDPO_DATABASE_URL"}}}, 422, "invalid_spec", "eval.judge.api_key_env"),
        ({"method": {"type": "factuality", "factuality": {"scorer": "reference"}}}, 422, "invalid_spec", "method.factuality.references_file_id"),
        ({"method": {"type": "factuality", "factuality": {"references": "/etc/passwd"}}}, 422, "invalid_request", "method.factuality.references"),
        (
            {"method": {"type": "factuality", "factuality": {"scorer": "reference", "references_file_id": "file_nope"}}},
            404,
            "file_not_found",
            "method.factuality.references_file_id",
        ),
    ],
)
def test_bad_job_input_names_the_field_and_stores_nothing(http, body, status, code, param):
    before = http.get("/v1/jobs").json()["data"]
    error = error_of(http.post("/v1/jobs", json=body), status)
    assert (error["code"], error["param"]) == (code, param), error
    assert error["message"].startswith(param), error["message"]
    assert http.get("/v1/jobs").json()["data"] == before


def test_file_purpose_must_match_the_method(http):
    pairs = upload(http, jsonl(*PREFERENCES_TRL), purpose="preferences").json()["id"]
    prompts = upload(http, jsonl(*PROMPTS)).json()["id"]
    error = error_of(http.post("/v1/jobs", json={"method": {"type": "qdpo"}, "dataset": {"file_id": pairs}}), 422)
    assert (error["code"], error["param"]) == ("wrong_file_purpose", "dataset.file_id") and "needs a prompts file" in error["message"]
    error = error_of(http.post("/v1/jobs", json={"method": {"type": "dpo"}, "dataset": {"file_id": prompts}}), 422)
    assert "needs a preferences file" in error["message"]
    error = error_of(http.post("/v1/jobs", json={"dataset": {"eval_file_id": pairs}}), 422)
    assert error["param"] == "dataset.eval_file_id"


def test_factuality_job_reads_reference_passages_from_an_upload(http):
    passages = upload(http, jsonl({"text": "Paris is the capital of France.", "title": "Paris"}), purpose="references")
    assert passages.status_code == 201, passages.text
    bad = upload(http, jsonl({"title": "no text"}), purpose="references")
    assert error_of(bad, 422)["lines"] == [{"line": 1, "field": "text", "message": "is missing (each passage needs 'text')"}]
    prompts = upload(http, jsonl(*PROMPTS)).json()["id"]
    body = {"method": {"type": "factuality", "factuality": {"scorer": "reference", "references_file_id": prompts}}}
    error = error_of(http.post("/v1/jobs", json=body), 422)
    assert (error["code"], error["param"]) == ("wrong_file_purpose", "method.factuality.references_file_id")
    body["method"]["factuality"]["references_file_id"] = passages.json()["id"]
    job = http.post("/v1/jobs", json=body)
    assert job.status_code == 201, job.text
    assert job.json()["method"]["factuality"]["references_file_id"] == passages.json()["id"]
    assert "references" not in job.json()["method"]["factuality"]  # no server path is shown


def test_body_that_is_not_json(http):
    error = error_of(http.post("/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"}), 422)
    assert error["code"] == "invalid_request" and "JSON" in error["message"]


def test_idempotency_key_returns_the_first_job(http):
    headers = {"Idempotency-Key": "create-once-123"}
    first = http.post("/v1/jobs", json={"seed": 1}, headers=headers)
    again = http.post("/v1/jobs", json={"seed": 1}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert len(http.get("/v1/jobs").json()["data"]) == 1


def test_list_paginates_newest_first_and_filters_by_status(http):
    ids = [http.post("/v1/jobs", json={"seed": n}).json()["id"] for n in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        page = http.get("/v1/jobs", params={"limit": 2, **({"after": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == ids[::-1] and pages == 3
    http.post(f"/v1/jobs/{ids[1]}/cancel")
    cancelled = http.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    assert len(http.get("/v1/jobs", params={"status": "queued"}).json()["data"]) == 4
    assert error_of(http.get("/v1/jobs", params={"status": "done"}), 422)["param"] == "status"
    assert error_of(http.get("/v1/jobs", params={"limit": 101}), 422)["param"] == "limit"
    assert error_of(http.get("/v1/jobs", params={"after": "job_unknown"}), 422)["code"] == "invalid_cursor"


def test_cancel_a_queued_job_takes_effect_at_once(http):
    job = http.post("/v1/jobs", json={}).json()
    cancelled = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert (body["status"], body["cancel_requested"]) == ("cancelled", True) and body["finished_at"] is not None
    assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    messages = [e["message"] for e in http.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert messages[-1] == "cancelled before it started"


def test_outputs_of_an_unfinished_job_answer_409(http):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    for path in ("report", "adapter"):
        error = error_of(http.get(f"/v1/jobs/{job_id}/{path}"), 409)
        assert error["code"] == f"{path}_not_ready" and error["param"] == "job_id" and "queued" in error["message"]
    assert http.get(f"/v1/jobs/{job_id}/metrics").json()["data"] == []
    assert http.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"] == []


def test_delete_needs_a_finished_job_and_then_removes_everything(http):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    error = error_of(http.delete(f"/v1/jobs/{job_id}"), 409)
    assert error["code"] == "job_not_finished" and "cancel it first" in error["message"]
    http.post(f"/v1/jobs/{job_id}/cancel")
    assert http.delete(f"/v1/jobs/{job_id}").json() == {"id": job_id, "object": "job", "deleted": True}
    for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel"), ("DELETE", "")):
        error = error_of(http.request(method, f"/v1/jobs/{job_id}{path}"), 404)
        assert (error["code"], error["param"]) == ("job_not_found", "job_id")


def test_event_paging(http):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    http.post(f"/v1/jobs/{job_id}/cancel")
    events = http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert len(events) == 3 and all(e["type"] == "status" for e in events)
    first = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1}).json()
    assert first["has_more"] and first["data"] == events[:1]
    rest = http.get(f"/v1/jobs/{job_id}/events", params={"after": first["next_cursor"]}).json()
    assert rest["data"] == events[1:] and not rest["has_more"]
    assert http.get(f"/v1/jobs/{job_id}/events", params={"type": "log"}).json()["data"] == []
    assert error_of(http.get(f"/v1/jobs/{job_id}/events", params={"after": "17"}), 422)["param"] == "after"
    assert error_of(http.get(f"/v1/jobs/{job_id}/events", params={"limit": 0}), 422)["param"] == "limit"


def test_event_stream_of_a_finished_job_replays_then_ends(http):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    http.post(f"/v1/jobs/{job_id}/cancel")
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    assert text.count("event: status") == 3 and "event: end" in text and '"status": "cancelled"' in text


def test_method_auto_and_the_init_settings_are_accepted_and_shown_back(http):
    body = {
        "method": {
            "type": "auto",
            "auto": {"candidates": ["init", "kd"]},
            "hyperparameters": {"init": "calibrated", "init_calibration_prompts": 32, "kd_objective": "cakld"},
        }
    }
    job = http.post("/v1/jobs", json=body).json()
    assert job["method"]["type"] == "auto" and job["method"]["auto"] == {"candidates": ["init", "kd"]}
    assert (job["method"]["hyperparameters"]["init"], job["method"]["hyperparameters"]["kd_objective"]) == ("calibrated", "cakld")
    before = http.get("/v1/jobs").json()["data"]
    error = error_of(http.post("/v1/jobs", json={"method": {"type": "auto", "auto": {"candidates": ["init", "magic"]}}}), 422)
    assert error["param"] == "method.auto.candidates[1]" and "kd" in error["message"]
    error = error_of(http.post("/v1/jobs", json={"method": {"type": "kd", "auto": {"candidates": ["init"]}}}), 422)
    assert error["param"] == "method.auto"
    error = error_of(http.post("/v1/jobs", json={"method": {"hyperparameters": {"init": "magic"}}}), 422)
    assert error["param"] == "method.hyperparameters.init"
    assert http.get("/v1/jobs").json()["data"] == before  # nothing stored
