"""The `qdpo` command line against the API deployment (real server, real database)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .helpers import PROMPTS, write_jsonl
from .infra import REPO

pytestmark = pytest.mark.service


def qdpo(deployment, *args: str, key: str | None = None) -> subprocess.CompletedProcess:
    env = {**deployment.env, "QDPO_BASE_URL": deployment.base_url, "COLUMNS": "200"}
    if key:
        env["QDPO_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "qdpo_cli.main", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_keys_create_list_revoke(api_deployment):
    created = qdpo(api_deployment, "keys", "create", "--tenant", "cli-tenant", "--name", "laptop")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    key_id = created.stdout.split()[1]
    assert key.startswith("qdpo_sk_") and key_id.startswith("key_")
    listing = qdpo(api_deployment, "keys", "list", "--tenant", "cli-tenant").stdout
    assert key_id in listing and "active" in listing and key not in listing  # only the prefix is ever shown
    assert qdpo(api_deployment, "models", "list", key=key).returncode == 0
    assert qdpo(api_deployment, "keys", "revoke", key_id).returncode == 0
    denied = qdpo(api_deployment, "models", "list", key=key)
    assert denied.returncode == 1 and "invalid_api_key" in denied.stderr


def test_files_and_jobs_commands(api_deployment, tenant_key, tmp_path):
    uploaded = qdpo(api_deployment, "files", "upload", str(write_jsonl(tmp_path / "p.jsonl", *PROMPTS)), "--purpose", "prompts", key=tenant_key)
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = json.loads(uploaded.stdout)["id"]
    created = qdpo(
        api_deployment,
        "jobs",
        "create",
        "--quantization",
        "rtn",
        "--bits",
        "3",
        "--file",
        file_id,
        "--hp",
        "beta=0.2",
        "--hp",
        "loss=hinge",
        "--set",
        "generation.max_new_tokens=16",
        "--set",
        "dataset.eval_fraction=0.25",
        "--suffix",
        "cli",
        "--metadata",
        "team=search",
        key=tenant_key,
    )
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout.split("\n", 1)[1])
    assert (job["quantization"]["bits"], job["method"]["hyperparameters"]["beta"], job["method"]["hyperparameters"]["loss"]) == (3, 0.2, "hinge")
    assert (job["generation"]["max_new_tokens"], job["dataset"]["eval_fraction"], job["dataset"]["file_id"], job["metadata"]) == (
        16,
        0.25,
        file_id,
        {"team": "search"},
    )
    listing = qdpo(api_deployment, "jobs", "list", key=tenant_key).stdout
    assert job["id"] in listing and "queued" in listing
    assert json.loads(qdpo(api_deployment, "jobs", "cancel", job["id"], key=tenant_key).stdout)["status"] == "cancelled"
    events = qdpo(api_deployment, "jobs", "events", job["id"], key=tenant_key).stdout
    assert "cancelled before it started" in events
    followed = qdpo(api_deployment, "jobs", "events", job["id"], "--follow", key=tenant_key)  # SSE; ends with the job
    assert followed.returncode == 0 and followed.stdout.strip().endswith("cancelled before it started")


def test_cli_errors_name_the_field_and_exit_nonzero(api_deployment, tenant_key, tmp_path):
    bad = qdpo(api_deployment, "jobs", "create", "--hp", "beta=50", key=tenant_key)
    assert bad.returncode == 1 and "invalid_spec" in bad.stderr and "(field: method.hyperparameters.beta)" in bad.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"question": "?"}\n')
    rejected = qdpo(api_deployment, "files", "upload", str(broken), "--purpose", "prompts", key=tenant_key)
    assert rejected.returncode == 1 and "line 2:" in rejected.stderr
    missing = qdpo(api_deployment, "jobs", "get", "job_nope", key=tenant_key)
    assert missing.returncode == 1 and "job_not_found" in missing.stderr


def test_cli_reports_an_unreachable_server(api_deployment):
    from .infra import free_port

    env_args = ("--base-url", f"http://127.0.0.1:{free_port()}", "--api-key", "x")
    result = qdpo(api_deployment, *env_args, "jobs", "list")
    assert result.returncode == 1 and "cannot reach" in result.stderr
