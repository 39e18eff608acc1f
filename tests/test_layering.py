"""The layering the architecture promises, checked in fresh interpreters.

- The API process and the client never load torch (or transformers / peft / bitsandbytes): they
  must start fast and run where no GPU stack is installed.
- qdpo_core never imports the service's frameworks (FastAPI, Celery, SQLAlchemy, …).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
SERVICE_FRAMEWORKS = ("fastapi", "starlette", "celery", "kombu", "sqlalchemy", "alembic", "psycopg", "redis", "uvicorn", "sse_starlette", "prometheus_client", "qdpo_client", "api", "worker")


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
        "import qdpo_client; from qdpo_client.cli import build_parser; build_parser()",
        "import worker.tasks",  # the worker's parent process forks its pool before any job loads torch
    ],
)
def test_service_processes_do_not_load_torch(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = modules_after(f"import os, sys; os.environ['QDPO_VAR_DIR'] = {str(tmp_path / 'var')!r}; sys.path.insert(0, {str(REPO)!r}); " + code)
    assert not loaded & set(HEAVY), f"{code!r} loaded {sorted(loaded & set(HEAVY))}"


def test_importing_the_client_loads_no_server_code():
    loaded = modules_after("import qdpo_client")
    assert not loaded & {"fastapi", "sqlalchemy", "celery", "api", "worker", "qdpo_core"}, sorted(loaded)


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_qdpo_core_imports_no_service_framework():
    sources = sorted((REPO / "qdpo_core").rglob("*.py"))
    assert sources, "qdpo_core has no sources?"
    offenders = {str(p.relative_to(REPO)): sorted(_imported_roots(p) & set(SERVICE_FRAMEWORKS)) for p in sources}
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"qdpo_core must stay a pure library: {offenders}"


def test_torch_free_core_modules_stay_torch_free():
    # The API validates jobs and uploads with these; they must not drag torch in.
    loaded = modules_after("import qdpo_core.config, qdpo_core.errors, qdpo_core.events, qdpo_core.registry, qdpo_core.datasets")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
