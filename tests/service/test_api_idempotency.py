"""Idempotency-Key: a retry gets the first job back; the same key with another body is refused."""

from __future__ import annotations

import pytest

from .helpers import error_of, raw

pytestmark = pytest.mark.service


@pytest.fixture
def http(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as client:
        yield client


def test_a_key_reused_with_a_different_body_is_refused_naming_the_difference(http):
    headers = {"Idempotency-Key": "order-7781"}
    first = http.post("/v1/jobs", json={"seed": 1, "method": {"hyperparameters": {"beta": 0.1}}}, headers=headers)
    assert first.status_code == 201, first.text
    different = http.post("/v1/jobs", json={"seed": 2, "method": {"hyperparameters": {"beta": 0.1}}}, headers=headers)
    error = error_of(different, 422)
    assert (error["code"], error["param"]) == ("idempotency_key_reused", "Idempotency-Key")
    assert error["message"].startswith("Idempotency-Key:") and "seed" in error["message"] and first.json()["id"] in error["message"]
    assert "beta" not in error["message"]  # only what differs is named
    assert [j["id"] for j in http.get("/v1/jobs").json()["data"]] == [first.json()["id"]]  # nothing new stored
    # the same request again, written differently (key order, explicit nulls), is the same request
    again = http.post("/v1/jobs", json={"method": {"hyperparameters": {"beta": 0.1}}, "suffix": None, "seed": 1}, headers=headers)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])


def test_a_key_reused_for_a_request_that_differs_deep_inside_is_refused(http):
    headers = {"Idempotency-Key": "deep-1"}
    assert http.post("/v1/jobs", json={"eval": {"judge": {"kind": "local", "chain_of_thought": True}}}, headers=headers).status_code == 201
    error = error_of(http.post("/v1/jobs", json={"eval": {"judge": {"kind": "local"}}}, headers=headers), 422)
    assert error["code"] == "idempotency_key_reused" and "eval.judge.chain_of_thought" in error["message"]


def test_an_empty_key_is_no_key(http):
    first = http.post("/v1/jobs", json={"seed": 1}, headers={"Idempotency-Key": ""})
    second = http.post("/v1/jobs", json={"seed": 2}, headers={"Idempotency-Key": ""})
    assert (first.status_code, second.status_code) == (201, 201) and first.json()["id"] != second.json()["id"]
