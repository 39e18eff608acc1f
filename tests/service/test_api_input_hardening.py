"""Input the API must refuse with a 4xx naming the field, before anything is stored (real Postgres).

Each of these once reached the database or a worker: lone surrogates and NUL in job strings, file
lines and file names (500s, a tenant's job list broken for good, jobs failing three times in
`prepare`), path and query values the database cannot compare, event cursors that overflowed,
numbers and lists without bounds, strings for numbers and bools for integers, oversized bodies.
"""

from __future__ import annotations

import json

import pytest

from .helpers import error_of, jsonl, raw, upload

pytestmark = pytest.mark.service


@pytest.fixture
def http(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as client:
        yield client


def post_json(http, body, headers=None):
    """Send `body` as JSON text with \\uXXXX escapes, the way any client sends a lone surrogate or NUL."""
    return http.post("/v1/jobs", content=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})


def stored_jobs(api_deployment) -> int:
    from sqlalchemy import func, select

    from service.tables import Job

    with api_deployment.sessions() as session:
        return session.scalar(select(func.count()).select_from(Job))


def set_path(path: str, value):
    """{"a": {"b": value}} for "a.b"."""
    body: dict = {}
    node = body
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return body


# --- the job schema, walked: every string, number and list of JobCreate ------------------------------


@pytest.fixture(scope="module")
def job_fields(api_deployment):
    """{dotted path: JSON schema} of every leaf field of JobCreate, from the live OpenAPI document."""
    import httpx

    document = httpx.get(f"{api_deployment.base_url}/openapi.json", timeout=30).json()
    components = document["components"]["schemas"]

    def resolve(schema):
        while "$ref" in schema:
            schema = components[schema["$ref"].rsplit("/", 1)[-1]]
        return schema

    def leaves(schema, path):
        schema = resolve(schema)
        options = [resolve(s) for s in schema.get("anyOf", [])] or [schema]
        options = [s for s in options if s.get("type") != "null"]
        objects = [s for s in options if "properties" in s]
        if objects:
            for name, sub in objects[0]["properties"].items():
                if name == "type" and path == "method":
                    continue  # method.type picks the rest; it is an enum, tested below
                yield from leaves(sub, f"{path}.{name}" if path else name)
        else:
            yield path, options

    return dict(leaves(components["JobCreate"], ""))


def _kinds(options) -> set:
    kinds = set()
    for option in options:
        for sub in option.get("oneOf", [option]):
            kinds.add("enum" if "enum" in sub else sub.get("type"))
    return kinds


def _body_for(path: str, value):
    body = set_path(path, value)
    # settings of rlaif / factuality are only accepted for that method
    for method in ("rlaif", "factuality"):
        if path.startswith(f"method.{method}."):
            body["method"]["type"] = method
    return body


@pytest.mark.parametrize("bad", ["\ud800", "a\x00b"], ids=["lone-surrogate", "nul"])
def test_every_string_of_a_job_refuses_bad_text_naming_the_field(http, api_deployment, job_fields, bad):
    strings = [path for path, options in job_fields.items() if "string" in _kinds(options)]
    assert {"model", "suffix", "dataset.file_id", "eval.judge.model", "eval.judge.base_url", "method.hyperparameters.target_modules"} <= set(strings)
    before = stored_jobs(api_deployment)
    for path in strings:
        error = error_of(post_json(http, _body_for(path, bad)), 422)
        assert (error["code"], error["param"]) == ("invalid_request", path), error
        assert error["message"].startswith(path + ":") and ("lone surrogate" in error["message"] or "NUL" in error["message"]), error
    assert stored_jobs(api_deployment) == before
    assert http.get("/v1/jobs").status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"metadata": {"k": "\ud800"}}, "metadata.k"),
        ({"metadata": {"\ud800": "v"}}, "metadata"),
        ({"metadata": {"k": "\x00"}}, "metadata.k"),
        ({"method": {"hyperparameters": {"target_modules": ["q_proj", "\ud800"]}}}, "method.hyperparameters.target_modules[1]"),
        ({"eval": {"judge": {"kind": "openai", "model": "m", "base_url": "http://\ud800/v1"}}}, "eval.judge.base_url"),
        ({"method": {"type": "rlaif", "rlaif": {"labeler": {"api_key_env": "QDPO_LABELER_\x00"}}}}, "method.rlaif.labeler.api_key_env"),
    ],
)
def test_bad_text_inside_lists_and_dicts_is_named_where_it_is(http, api_deployment, body, param):
    before = stored_jobs(api_deployment)
    error = error_of(post_json(http, body), 422)
    assert error["param"] == param, error
    assert stored_jobs(api_deployment) == before
    listed = http.get("/v1/jobs")
    assert listed.status_code == 200 and listed.json()["data"] == []


def test_every_number_of_a_job_refuses_bools_strings_and_unbounded_values(http, api_deployment, job_fields):
    numbers = [path for path, options in job_fields.items() if _kinds(options) & {"integer", "number"}]
    assert {"seed", "generation.num_samples", "method.hyperparameters.beta", "method.hyperparameters.epochs", "dataset.max_train_prompts"} <= set(numbers)
    before = stored_jobs(api_deployment)
    for path in numbers:
        for bad in (True, "1", 10**30, -(10**30)):
            response = post_json(http, _body_for(path, bad))
            error = error_of(response, 422)
            assert error["param"] == path, (path, bad, error)
            assert error["message"].startswith(path + ":"), error
    assert stored_jobs(api_deployment) == before


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"seed": 2**70}, "seed", "2^32 - 1"),
        ({"generation": {"num_samples": 10**6, "do_sample": True}}, "generation.num_samples", "1..64"),
        ({"method": {"hyperparameters": {"target_modules": ["q_proj"] * 65}}}, "method.hyperparameters.target_modules", "1 to 64"),
        ({"quantization": {"method": "rtn", "bits": 3, "double_quant": True}}, "quantization.double_quant", "nf4, fp4"),
        ({"method": {"hyperparameters": {"beta": "0.1"}}}, "method.hyperparameters.beta", "valid number"),
        ({"method": {"hyperparameters": {"epochs": True}}}, "method.hyperparameters.epochs", "valid integer"),
        ({"generation": {"do_sample": 1}}, "generation.do_sample", "valid boolean"),
        ({"quantization": {"method": "rtn", "bits": 3.0}}, "quantization.bits", "valid integer"),
        ({"method": {"hyperparameters": {"target_modules": 5}}}, "method.hyperparameters.target_modules", "a string or a list"),
    ],
)
def test_values_accepted_before_and_failing_later_are_refused(http, api_deployment, body, param, fragment):
    before = stored_jobs(api_deployment)
    error = error_of(post_json(http, body), 422)
    assert error["param"] == param and fragment in error["message"], error
    assert stored_jobs(api_deployment) == before


def test_nan_and_infinity_are_not_numbers(http, api_deployment):
    before = stored_jobs(api_deployment)
    for literal in ("NaN", "Infinity", "-Infinity"):
        content = '{"method": {"hyperparameters": {"beta": ' + literal + "}}}"
        error = error_of(http.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"}), 422)
        assert error["param"] == "method.hyperparameters.beta", error
    assert stored_jobs(api_deployment) == before


# --- bodies ------------------------------------------------------------------------------------------


def test_a_json_body_over_the_request_limit_is_refused_but_uploads_keep_their_own_limit(http, api_deployment):
    settings = api_deployment.settings
    assert settings.max_request_bytes < settings.max_upload_bytes
    before = stored_jobs(api_deployment)
    body = {"method": {"hyperparameters": {"target_modules": ["q_proj"] * (settings.max_request_bytes // 8)}}}
    error = error_of(post_json(http, body), 413)
    assert error["code"] == "request_too_large" and "QDPO_MAX_REQUEST_BYTES" in error["message"] and f"{settings.max_request_bytes:,}" in error["message"]

    def chunks():  # no Content-Length: counted as it streams
        data = json.dumps(body).encode()
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]

    error = error_of(http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert error["code"] == "request_too_large"
    assert stored_jobs(api_deployment) == before
    # a file larger than the JSON limit (but within the upload limit) still uploads
    line = jsonl({"prompt": "x" * 200})
    content = line * (settings.max_request_bytes // len(line) + 10)
    assert settings.max_request_bytes < len(content) < settings.max_upload_bytes
    assert upload(http, content).status_code == 201


# --- files -------------------------------------------------------------------------------------------


def test_a_prompts_file_with_a_lone_surrogate_escape_is_refused_with_line_and_field(http):
    before = http.get("/v1/files").json()["data"]
    content = b'{"prompt": "fine"}\n{"prompt": "\\ud800"}\n{"prompt": "ok", "metadata": {"k": "\\u0000"}}\n'
    error = error_of(upload(http, content), 422)
    assert error["code"] == "invalid_file" and error["param"] == "file"
    assert [(line["line"], line["field"]) for line in error["lines"]] == [(2, "prompt"), (3, "metadata.k")]
    assert "lone surrogate" in error["lines"][0]["message"] and "NUL" in error["lines"][1]["message"]
    assert http.get("/v1/files").json()["data"] == before


def raw_multipart(http, filename: bytes, content: bytes):
    """A multipart upload written by hand: HTTP clients escape control characters in file names, curl and others do not."""
    boundary = b"qdpo-test-boundary"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nprompts\r\n'
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n"
    )
    return http.post("/v1/files", content=body, headers={"Content-Type": "multipart/form-data; boundary=" + boundary.decode()})


@pytest.mark.parametrize("filename", [b"a\x00b.jsonl", b"tab\there.jsonl", b"bell\x07.jsonl", b"del\x7f.jsonl"])
def test_an_upload_whose_file_name_has_control_characters_is_refused(http, filename):
    assert raw_multipart(http, b"fine.jsonl", jsonl({"prompt": "hi"})).status_code == 201  # the hand-made upload itself is sound
    before = http.get("/v1/files").json()["data"]
    error = error_of(raw_multipart(http, filename, jsonl({"prompt": "hi"})), 422)
    assert (error["code"], error["param"]) == ("invalid_filename", "file") and error["message"].startswith("file: the file name")
    assert http.get("/v1/files").json()["data"] == before


# --- path, query and header values -------------------------------------------------------------------


@pytest.mark.parametrize("odd", ["job_%00", "%00", "job_" + "f" * 300, "job_%F0%9F%92%A9", "job_%ED%A0%80", "job_abc%27%3B--"])
def test_odd_job_ids_answer_404_without_reaching_the_database(http, odd):
    for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/metrics"), ("GET", "/checkpoints"), ("POST", "/cancel"), ("DELETE", "")):
        error = error_of(http.request(method, f"/v1/jobs/{odd}{path}"), 404)
        assert (error["code"], error["param"]) == ("job_not_found", "job_id")


@pytest.mark.parametrize("odd", ["file_%00", "%00", "file_%ED%A0%80", "file_" + "0" * 300])
def test_odd_file_ids_answer_404(http, odd):
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        assert error_of(http.request(method, f"/v1/files/{odd}{path}"), 404)["code"] == "file_not_found"
    error = error_of(post_json(http, {"dataset": {"file_id": "file_0\x00"}}), 422)
    assert error["param"] == "dataset.file_id"


@pytest.mark.parametrize("cursor", ["job_%00", "%00", "job_%ED%A0%80", "x" * 500])
def test_odd_list_cursors_answer_invalid_cursor(http, cursor):
    for path in ("/v1/jobs", "/v1/files"):
        error = error_of(http.get(f"{path}?after={cursor}"), 422)
        assert (error["code"], error["param"]) == ("invalid_cursor", "after")


def test_an_idempotency_key_that_is_not_printable_ascii_is_refused(http, api_deployment):
    before = stored_jobs(api_deployment)
    for key in (b"\xe9t\xe9", b"k" * 256):
        error = error_of(http.post("/v1/jobs", json={}, headers={"Idempotency-Key": key}), 422)
        assert error["param"] == "Idempotency-Key" and error["message"] == "Idempotency-Key: use 1 to 255 printable ASCII characters, such as a UUID", error
    # control characters never get past the HTTP server
    assert http.post("/v1/jobs", json={}, headers={"Idempotency-Key": b"a\x01b"}).status_code == 400
    assert stored_jobs(api_deployment) == before


@pytest.mark.parametrize("cursor", ["evt_99999999999999999999", "evt_%C2%B2", "evt_9223372036854775808", "evt_2147483648", "evt_-1", "evt_%00", "17"])
def test_event_cursors_that_are_not_event_ids_answer_invalid_cursor(http, cursor):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    error = error_of(http.get(f"/v1/jobs/{job_id}/events?after={cursor}"), 422)
    assert (error["code"], error["param"]) == ("invalid_cursor", "after"), error
    error = error_of(http.get(f"/v1/jobs/{job_id}/events?after={cursor}&stream=true"), 422)
    assert error["param"] == "after"


@pytest.mark.parametrize("cursor", ["evt_99999999999999999999", "evt_²", "evt_9223372036854775808", "nope"])
def test_a_last_event_id_that_is_not_an_event_id_answers_422_before_streaming(http, cursor):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    headers = {"Accept": "text/event-stream", "Last-Event-ID": cursor.encode("utf-8")}
    response = http.get(f"/v1/jobs/{job_id}/events", headers=headers)
    error = error_of(response, 422)
    assert (error["code"], error["param"]) == ("invalid_cursor", "Last-Event-ID"), error
    assert error["message"].startswith("Last-Event-ID:")
