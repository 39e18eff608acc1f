"""The `qdpo` command line against the API deployment (real server, real database).

Every command runs with XDG_CONFIG_HOME (and, where the lookup itself is tested, HOME) pointing into
the test's own directories: the real user's client config is never read or written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .helpers import PROMPTS, write_jsonl
from .infra import REPO, create_database, drop_database, free_port

pytestmark = pytest.mark.service
NO_CONFIG_HOME = Path(tempfile.gettempdir()) / f"qdpo-test-no-config-{os.getpid()}"  # never created: no client config


@pytest.fixture(autouse=True)
def config_home(tmp_path) -> Path:
    """This test's XDG_CONFIG_HOME (empty unless the test writes a client config into it)."""
    return tmp_path / "xdg-config"


def run_qdpo(*args: str, env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdpo_cli.main", *args], env={"COLUMNS": "200", **env}, cwd=cwd, capture_output=True, text=True, timeout=120)


def qdpo(deployment, *args: str, key: str | None = None, config_home: Path | None = None) -> subprocess.CompletedProcess:
    env = {**deployment.env, "QDPO_BASE_URL": deployment.base_url, "XDG_CONFIG_HOME": str(config_home or NO_CONFIG_HOME)}
    if key:
        env["QDPO_API_KEY"] = key
    return run_qdpo(*args, env=env)


def client_env(deployment, config_home: Path, **values: str) -> dict:
    """The deployment's environment with no client settings at all, plus `values`."""
    env = {k: v for k, v in deployment.env.items() if k not in ("QDPO_BASE_URL", "QDPO_API_KEY", "QDPO_HOST", "QDPO_PORT")}
    return {**env, "XDG_CONFIG_HOME": str(config_home), **values}


def write_config(config_home: Path, **values) -> Path:
    path = config_home / "qdpo" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


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
    # An API process trusts a key it has checked for QDPO_API_KEY_CACHE_SECONDS; once that has passed the key is refused.
    time.sleep(api_deployment.settings.api_key_cache_seconds + 0.5)
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


def test_run_help_after_a_global_option_is_the_local_runners(tmp_path, config_home):
    result = run_qdpo("--base-url", "http://x", "run", "--help", env={**os.environ, "XDG_CONFIG_HOME": str(config_home)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: qdpo run") and "--quant" in result.stdout


def test_qdpo_port_finds_the_server_it_names(api_deployment, tenant_key, tmp_path, config_home):
    port = api_deployment.base_url.rsplit(":", 1)[1]
    result = run_qdpo("files", "list", env=client_env(api_deployment, config_home, QDPO_PORT=port, QDPO_API_KEY=tenant_key), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with_host = client_env(api_deployment, config_home, QDPO_HOST="0.0.0.0", QDPO_PORT=port, QDPO_API_KEY=tenant_key)  # a bind address
    assert run_qdpo("models", "list", env=with_host, cwd=tmp_path).returncode == 0


def test_the_client_config_finds_server_and_key_from_any_directory(api_deployment, tenant_key, tmp_path, config_home, monkeypatch):
    write_config(config_home, base_url=api_deployment.base_url + "/", api_key=tenant_key)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = run_qdpo("models", "list", env=client_env(api_deployment, config_home), cwd=elsewhere)
    assert listed.returncode == 0 and "smollm2-135m-instruct" in listed.stdout, listed.stderr
    assert not (elsewhere / "var").exists()

    # Without XDG_CONFIG_HOME the config is ~/.config/qdpo/config.json.
    home = tmp_path / "home"
    write_config(home / ".config", base_url=api_deployment.base_url, api_key=tenant_key)
    env = {k: v for k, v in client_env(api_deployment, config_home).items() if k != "XDG_CONFIG_HOME"}
    assert run_qdpo("files", "list", env={**env, "HOME": str(home)}, cwd=elsewhere).returncode == 0

    # The SDK finds them the same way.
    from qdpo_client import Client

    for name in ("QDPO_BASE_URL", "QDPO_API_KEY", "QDPO_HOST", "QDPO_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    with Client(max_retries=0) as client:
        assert client.connection.base_url == api_deployment.base_url and client.files.list().data == []


def test_the_config_key_is_sent_only_to_the_configs_server(api_deployment, tenant_key, tmp_path, config_home):
    path = write_config(config_home, base_url=f"http://127.0.0.1:{free_port()}", api_key=tenant_key)
    result = run_qdpo("models", "list", env=client_env(api_deployment, config_home, QDPO_BASE_URL=api_deployment.base_url), cwd=tmp_path)
    assert result.returncode == 1
    assert "no API key was sent" in result.stderr and str(path) in result.stderr and "qdpo keys create --tenant" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_rejected_key_says_where_it_came_from_and_how_to_get_one(api_deployment, tmp_path, config_home):
    env = client_env(api_deployment, config_home, QDPO_BASE_URL=api_deployment.base_url, QDPO_API_KEY="qdpo_sk_not_a_real_key_at_all")
    from_env = run_qdpo("files", "list", env=env, cwd=tmp_path)
    assert from_env.returncode == 1 and "invalid_api_key" in from_env.stderr
    assert "came from QDPO_API_KEY" in from_env.stderr and "qdpo keys create --tenant" in from_env.stderr
    assert "qdpo_sk_not_a_real_key_at_all" not in from_env.stderr  # a key is never printed whole
    from_flag = run_qdpo("--api-key", "qdpo_sk_another_wrong_key", "jobs", "events", "job_x", "--follow", env=env, cwd=tmp_path)  # a stream, too
    assert from_flag.returncode == 1 and "came from --api-key" in from_flag.stderr and "Traceback" not in from_flag.stderr


def test_an_unreachable_server_says_which_url_it_tried_and_why(api_deployment, tmp_path, config_home):
    port = free_port()
    result = run_qdpo("files", "list", env=client_env(api_deployment, config_home, QDPO_PORT=str(port)), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot reach the qdpo service at http://127.0.0.1:{port}" in result.stderr and f"QDPO_PORT={port}" in result.stderr
    assert "qdpo serve" in result.stderr and "--base-url" in result.stderr
    path = write_config(config_home, base_url=f"http://127.0.0.1:{port}", api_key="qdpo_sk_x")
    from_config = run_qdpo("jobs", "list", env=client_env(api_deployment, config_home), cwd=tmp_path)
    assert from_config.returncode == 1 and f"the client config {path}" in from_config.stderr


@pytest.mark.parametrize("command", [("keys", "list"), ("keys", "revoke", "key_nope"), ("keys", "create", "--tenant", "t")])
def test_key_commands_never_create_a_database(command, tmp_path, config_home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QDPO_")}
    env.update({"XDG_CONFIG_HOME": str(config_home), "PYTHONPATH": str(REPO)})
    result = run_qdpo(*command, env=env, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"sqlite:///{tmp_path / 'var' / 'qdpo.db'}" in result.stderr
    assert "qdpo migrate" in result.stderr and "QDPO_DATABASE_URL" in result.stderr and "QDPO_VAR_DIR" in result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be created by a failed key command"

    other = tmp_path / "other-var"
    named = run_qdpo(*command, env={**env, "QDPO_VAR_DIR": str(other)}, cwd=tmp_path)
    assert named.returncode == 1 and f"QDPO_VAR_DIR={other}" in named.stderr and not other.exists()


def test_key_commands_on_an_unmigrated_database_say_to_migrate(api_deployment, config_home):
    name, url = create_database("qdpo_test_empty")
    try:
        env = {**api_deployment.env, "QDPO_DATABASE_URL": url, "XDG_CONFIG_HOME": str(config_home)}
        result = run_qdpo("keys", "list", env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "has no qdpo schema" in result.stderr and "(from QDPO_DATABASE_URL)" in result.stderr and "qdpo migrate" in result.stderr
    finally:
        drop_database(name)
