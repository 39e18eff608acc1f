"""What the OpenAPI document promises and how the API answers what it does not serve (real app)."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from qdpo_core import config

from .helpers import error_of, raw

pytestmark = pytest.mark.service


@pytest.fixture
def http(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as client:
        yield client


@pytest.fixture(scope="module")
def openapi(api_deployment) -> dict:
    return httpx.get(f"{api_deployment.base_url}/openapi.json", timeout=30).json()


def _resolve(document, schema):
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def test_file_upload_is_declared_as_multipart_with_a_binary_file(openapi):
    content = openapi["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert list(content) == ["multipart/form-data"]
    form = _resolve(openapi, content["multipart/form-data"]["schema"])
    file_schema = form["properties"]["file"]
    assert file_schema.get("format") == "binary" or file_schema.get("contentMediaType") == "application/octet-stream", file_schema
    assert set(form["required"]) == {"file", "purpose"}


# dataclass -> request schema holding its fields (None: not exposed as such)
SPEC_SCHEMAS = {
    config.QuantSpec: "QuantizationSettings",
    config.TrainSpec: "Hyperparameters",
    config.GenerationSpec: "GenerationSettings",
    config.EvalSpec: "EvalSettings",
    config.LabelerSpec: "LabelerSettings",
    config.RLAIFSpec: "RLAIFSettings",
    config.FactualitySpec: "FactualityOptions",
    config.DataSpec: "DatasetSettings",
}


def test_every_choice_field_of_the_spec_is_an_enum(openapi):
    schemas = openapi["components"]["schemas"]
    checked = []
    for cls, name in SPEC_SCHEMAS.items():
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            if not choices or f.name not in schemas[name]["properties"]:
                continue
            prop = schemas[name]["properties"][f.name]
            enums = [option.get("enum") for option in prop.get("anyOf", [prop]) if "enum" in option]
            assert enums == [list(choices)], (name, f.name, prop)
            checked.append(f"{name}.{f.name}")
    assert {"LabelerSettings.kind", "QuantizationSettings.method", "Hyperparameters.loss", "Hyperparameters.selection_metric"} <= set(checked)
    assert {"FactualityOptions.scorer", "RLAIFSettings.response_model", "FactualityOptions.response_model"} <= set(checked)
    method_type = schemas["MethodSettings"]["properties"]["type"]
    assert method_type["enum"] == list(config.METHODS)


def test_empty_query_values_mean_not_given(http):
    job_id = http.post("/v1/jobs", json={}).json()["id"]
    listed = http.get("/v1/jobs?status=&after=&limit=")
    assert listed.status_code == 200, listed.text
    assert [j["id"] for j in listed.json()["data"]] == [job_id]
    assert http.get("/v1/files?purpose=&after=&limit=").status_code == 200
    events = http.get(f"/v1/jobs/{job_id}/events?after=&limit=&type=&stream=")
    assert events.status_code == 200 and len(events.json()["data"]) == 2
    # a value that is given is still checked
    assert error_of(http.get("/v1/jobs?status=done&after="), 422)["param"] == "status"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/jobs/job_0123456789abcdef01234567", {"GET", "DELETE"}),
        ("PATCH", "/v1/jobs", {"GET", "POST"}),
        ("DELETE", "/v1/jobs", {"GET", "POST"}),
        ("PUT", "/v1/files/file_0123456789abcdef01234567", {"GET", "DELETE"}),
        ("POST", "/v1/jobs/job_0123456789abcdef01234567/adapter", {"GET", "HEAD"}),
    ],
)
def test_405_lists_every_method_the_path_supports(http, method, path, allowed):
    response = http.request(method, path)
    error = error_of(response, 405)
    assert error["code"] == "method_not_allowed" and set(error) == {"code", "message", "param"}
    listed = {m.strip() for m in response.headers["allow"].split(",")}
    assert allowed <= listed and method not in listed, response.headers["allow"]
