"""The embedded default: `qdpo serve` with no configuration at all (SQLite file, filesystem broker,
local artifacts, one real worker process), driven through the API like any deployment."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import httpx
import pytest

from qdpo_cli.demo import stop_service
from qdpo_client import Client

from .conftest import TINY_JOB
from .infra import REPO, free_port, wait_for

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_model_dir):
    """`qdpo serve` in an empty directory, with its own XDG_CONFIG_HOME (never the real user's)."""
    tmp_path = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("QDPO_")}
    env.update(
        {
            "QDPO_PORT": str(port),
            "QDPO_EXTRA_MODELS": json.dumps({"tiny": str(tiny_model_dir)}),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        }
    )
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "qdpo_cli.main", "serve"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base_url = f"http://127.0.0.1:{port}"

    def ready():
        if process.poll() is not None:
            raise RuntimeError((tmp_path / "serve.log").read_text())
        try:
            return httpx.get(f"{base_url}/readyz").status_code == 200 and b" ready." in (tmp_path / "serve.log").read_bytes()
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 120, 0.5, what="qdpo serve")
        yield base_url, tmp_path
    finally:
        stop_service(process)
        log.close()


def test_qdpo_serve_runs_a_job_with_no_configuration(embedded):
    base_url, cwd = embedded
    key = (cwd / "var" / "api_key").read_text().strip()
    assert key in (cwd / "serve.log").read_text()  # printed once at start-up for the user
    assert (cwd / "var" / "qdpo.db").is_file() and (cwd / "var" / "broker" / "queue").is_dir()
    assert httpx.get(f"{base_url}/readyz").json()["checks"]["broker"] == "ok"

    with Client(base_url, api_key=key) as client:
        job = client.jobs.create(**TINY_JOB)
        job = client.jobs.wait(job.id, poll_interval=0.5, timeout=240, progress=False)
        assert job.status == "succeeded" and job.progress.stage == "export"
        assert [m.step for m in client.jobs.metrics(job.id)] == [1, 2]
        assert client.jobs.report(job.id)["model"] == "tiny"
        out = client.jobs.download_adapter(job.id, cwd / "download")
    archive = cwd / "download" / f"{job.id}-adapter.tar.gz"
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == job.adapter.sha256
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert list((cwd / "var" / "artifacts" / "jobs").rglob("adapter.tar.gz"))


def test_qdpo_serve_writes_the_client_config_so_commands_work_from_any_directory(embedded):
    base_url, cwd = embedded
    config = cwd / "xdg-config" / "qdpo" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600  # it holds a key: readable by its user only
    assert json.loads(config.read_text()) == {"base_url": base_url, "api_key": (cwd / "var" / "api_key").read_text().strip()}
    assert str(config) in (cwd / "serve.log").read_text()

    elsewhere = cwd / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("QDPO_")}
    env.update({"XDG_CONFIG_HOME": str(cwd / "xdg-config"), "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    for command in (["models", "list"], ["files", "list"], ["jobs", "list"]):
        result = subprocess.run([sys.executable, "-m", "qdpo_cli.main", *command], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert list(elsewhere.iterdir()) == []  # no var/ made here
