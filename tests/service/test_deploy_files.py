"""docker-compose.yml, the Dockerfile and .dockerignore: no Docker engine here, so check what can be
checked — they parse, and every command, module, path and QDPO_ variable they name exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
# Read by qdpo_core (model cache location), not by the service's Settings.
CORE_VARIABLES = {"QDPO_MODEL_CACHE"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_compose_has_the_production_services(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    for name in ("postgres", "redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert {s["build"]["target"] for s in services.values() if "build" in s} == {"api", "worker"}


def test_volumes_are_declared_and_artifacts_shared_at_one_path(compose):
    declared = set(compose["volumes"])
    used = {v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])}
    assert used <= declared and {"pgdata", "artifacts"} <= used
    mounts = {name: [v for v in s.get("volumes", []) if v.startswith("artifacts:")] for name, s in compose["services"].items()}
    assert mounts["api"] == mounts["worker"] == ["artifacts:/var/lib/qdpo/artifacts"]
    assert compose["x-qdpo-environment"]["QDPO_ARTIFACT_DIR"] == "/var/lib/qdpo/artifacts"


def _variables(text: str) -> set[str]:
    return set(re.findall(r"\b(QDPO_[A-Z0-9_]+)", text))


def test_every_qdpo_variable_is_a_setting(compose, dockerfile):
    settings_fields = {f"QDPO_{name.upper()}" for name in Settings.model_fields}
    named = _variables((REPO / "docker-compose.yml").read_text()) | _variables(dockerfile)
    # Interpolated from the operator's environment, not passed to the code under that name.
    operator_only = {"QDPO_WORKERS", "QDPO_PORT"} & named
    unknown = named - settings_fields - CORE_VARIABLES - operator_only
    assert not unknown, f"not read by any code: {sorted(unknown)}"
    assert "QDPO_MODEL_CACHE" in (REPO / "qdpo_core" / "models.py").read_text()


def _commands(compose, dockerfile) -> list[list[str]]:
    commands = [s["command"] for s in compose["services"].values() if isinstance(s.get("command"), list) and s["command"][0] == "qdpo"]
    for line in re.findall(r"^CMD (\[.*\])$", dockerfile, flags=re.M):
        commands.append(yaml.safe_load(line))
    return commands


def test_every_qdpo_command_parses(compose, dockerfile):
    from qdpo_cli.main import build_parser

    commands = _commands(compose, dockerfile)
    assert {c[1] for c in commands} == {"migrate", "api", "worker"}
    for command in commands:
        args = build_parser().parse_args(command[1:])
        assert callable(args.handler), command


def test_healthcheck_modules_and_celery_app_exist(compose, dockerfile, monkeypatch, tmp_path):
    import importlib

    from service import config

    texts = [" ".join(s["healthcheck"]["test"]) for s in compose["services"].values() if "healthcheck" in s] + re.findall(
        r"CMD (celery .*)$", dockerfile, flags=re.M
    )
    apps = {m for text in texts for m in re.findall(r"celery -A ([\w.]+)", text)}
    assert apps == {"worker.celery_app"}
    monkeypatch.setenv("QDPO_VAR_DIR", str(tmp_path))
    config.get_settings.cache_clear()
    module = importlib.import_module("worker.celery_app")
    module.default_app.cache_clear()
    try:
        module.app.loader.import_default_modules()  # what a worker does at start-up
        assert module.app.main == "qdpo" and "qdpo.run_job" in module.app.tasks
    finally:
        module.default_app.cache_clear()
        config.get_settings.cache_clear()
    assert any("/healthz" in t for t in texts + [dockerfile]) and any("/readyz" in t for t in texts)


def test_dockerfile_targets_and_copied_paths(dockerfile):
    stages = re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, flags=re.M)
    assert {"base", "api", "worker"} <= set(stages)
    for line in re.findall(r"^COPY (.+)$", dockerfile, flags=re.M):
        *sources, _target = shlex.split(line)
        for source in sources:
            if source == "README.md" and not (REPO / source).exists():
                continue  # written alongside; `pip install .` needs it at build time
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    extras = re.findall(r'pip install "\.\[([\w,]+)\]"', dockerfile)
    assert extras == ["service", "core,service"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)
