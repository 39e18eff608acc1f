"""Schemathesis against the real app (the API-only deployment: real Postgres and Redis, no worker,
so jobs stay queued): requests generated from the OpenAPI document, valid and invalid alike, must
never get a 5xx, and every answer must match the response schema the document declares.

Bounded: a fixed seed, a fixed number of examples per operation, no coverage or stateful phase
(both enumerate far more cases than a test suite can wait for), no example database on disk.

The document is the app's own (`create_app(...).openapi()`, built at collection time, when the
deployment's URL is not known yet); every request goes to the live deployment. (Schemathesis's
fixture-based loader, `schemathesis.pytest.from_fixture`, does not run under pytest 9: it sets
`Node._nodeid`, which pytest 9 no longer has.)
"""

from __future__ import annotations

import tempfile

import pytest
import schemathesis

pytestmark = pytest.mark.service

CONFIG = {
    "seed": 20261201,
    "phases": {"examples": {"enabled": True}, "fuzzing": {"enabled": True}, "coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "generation": {"max-examples": 30, "database": "none", "deterministic": True, "mode": "all"},
}


def _openapi_document() -> dict:
    from api.main import create_app
    from service.config import Settings

    # Nothing is connected to while the document is built; the folders land in a throwaway directory.
    settings = Settings(var_dir=tempfile.mkdtemp(prefix="qdpo-openapi-"), database_url="sqlite://", broker_url="redis://127.0.0.1:6379/15")
    return create_app(settings).openapi()


schema = schemathesis.openapi.from_dict(_openapi_document(), config=schemathesis.Config.from_dict(CONFIG))


@pytest.fixture(scope="module")
def fuzz_key(api_deployment):
    return api_deployment.new_key("schemathesis")


@schema.parametrize()
def test_generated_requests_get_no_5xx_and_match_the_response_schema(case, api_deployment, fuzz_key):
    if case.operation.path.endswith("/events") and isinstance(case.query, dict):
        case.query["stream"] = "false"  # a live stream of a queued job never ends: page instead
    case.call_and_validate(
        base_url=api_deployment.base_url,
        headers={"Authorization": f"Bearer {fuzz_key}"},
        checks=[schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance],
        timeout=30,
    )
