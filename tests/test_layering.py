"""The layering the architecture promises: checked statically (every import statement, including
those inside functions) and in fresh interpreters.

    qdpo_cli     the `qdpo` command, server commands, the demo        may import everything
    api          HTTP: routes, schemas, error mapping                  service, qdpo_core (torch-free part)
    worker       Celery tasks running the pipeline                     service, qdpo_core
    service      settings, database, broker, artifact store            qdpo_core (torch-free part)
    qdpo_core    the pipeline library                                  no web, queue or database code
    qdpo_client  the SDK users install, and the client commands        httpx and friends only

- The API process and the client never load torch (or transformers / peft / bitsandbytes): they
  must start fast and run where no GPU stack is installed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
SERVICE_FRAMEWORKS = ("fastapi", "starlette", "celery", "kombu", "sqlalchemy", "alembic", "psycopg", "redis", "uvicorn", "sse_starlette", "prometheus_client")
WEB = ("fastapi", "starlette", "uvicorn", "sse_starlette")
OUR_PACKAGES = ("qdpo_core", "service", "api", "worker", "qdpo_client", "qdpo_cli")
# The qdpo_core modules that import no torch: what the API and the service layer may use.
TORCH_FREE_CORE = {"qdpo_core", "qdpo_core.config", "qdpo_core.errors", "qdpo_core.events", "qdpo_core.registry", "qdpo_core.datasets", "qdpo_core.outbound"}
# package: (roots it must not import, whether only TORCH_FREE_CORE modules of qdpo_core are allowed)
RULES = {
    "qdpo_core": (SERVICE_FRAMEWORKS + ("service", "api", "worker", "qdpo_client", "qdpo_cli"), False),
    "service": (WEB + HEAVY + ("api", "worker", "qdpo_client", "qdpo_cli"), True),
    "api": (HEAVY + ("worker", "qdpo_client", "qdpo_cli"), True),
    "worker": (WEB + ("api", "qdpo_client", "qdpo_cli"), False),
    "qdpo_client": (SERVICE_FRAMEWORKS + HEAVY + ("qdpo_core", "service", "api", "worker", "qdpo_cli"), False),
}


def modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import json

    return {name.split(".")[0] for name in json.loads(result.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize(
    "code",
    [
        "from api.main import create_app; create_app().openapi()",
        "import api.main; api.main.app",
        "import qdpo_client; from qdpo_cli.main import build_parser; build_parser()",
        "import service.reconciler, service.dispatch, service.inputs, service.fields",
        "import worker.tasks",  # the worker's parent process forks its pool before any job loads torch
    ],
)
def test_service_processes_do_not_load_torch(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = modules_after(f"import os, sys; os.environ['QDPO_VAR_DIR'] = {str(tmp_path / 'var')!r}; sys.path.insert(0, {str(REPO)!r}); " + code)
    assert not loaded & set(HEAVY), f"{code!r} loaded {sorted(loaded & set(HEAVY))}"


def test_importing_the_client_loads_no_server_code():
    loaded = modules_after("import qdpo_client")
    assert not loaded & {"fastapi", "sqlalchemy", "celery", "api", "service", "worker", "qdpo_core", "qdpo_cli"}, sorted(loaded)


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names (at any depth: function-level imports count)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "qdpo_core")
    return modules


def _violations(package: str) -> dict[str, list[str]]:
    forbidden, torch_free_core_only = RULES[package]
    sources = sorted((REPO / package).rglob("*.py"))
    assert sources, f"{package} has no sources?"
    offenders = {}
    for path in sources:
        modules = _imported_modules(path)
        bad = sorted(m for m in modules if m.split(".")[0] in forbidden)
        if torch_free_core_only:
            bad += sorted(m for m in modules if m.split(".")[0] == "qdpo_core" and m not in TORCH_FREE_CORE)
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    return offenders


@pytest.mark.parametrize("package", sorted(RULES))
def test_each_layer_imports_only_what_it_may(package):
    offenders = _violations(package)
    assert not offenders, f"{package} reaches outside its layer: {offenders}"


def test_the_layer_rules_catch_a_violation(tmp_path, monkeypatch):
    # The checker itself must be able to fail: a client module that imports the API is flagged.
    fake = tmp_path / "qdpo_client"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from api.main import create_app\n    import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert _violations("qdpo_client") == {"qdpo_client/bad.py": ["api.main", "torch"]}


def test_torch_free_core_modules_stay_torch_free():
    # The API validates jobs and uploads with these; they must not drag torch in.
    loaded = modules_after("import qdpo_core.config, qdpo_core.errors, qdpo_core.events, qdpo_core.registry, qdpo_core.datasets, qdpo_core.outbound")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
