"""Liveness and readiness probes (no API key needed)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz")
def liveness() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The database or the broker is unreachable."}})
async def readiness(request: Request) -> JSONResponse:
    """Ready to take jobs: the database answers (schema migrated) and the broker accepts connections."""
    state = request.app.state

    def check_database() -> str:
        with state.sessions() as session:
            version = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return f"ok (schema {version})"

    def check_broker() -> str:
        state.queue.ping(timeout=3.0)
        return "ok"

    checks, ready = {}, True
    for name, check in (("database", check_database), ("broker", check_broker)):
        try:
            with anyio.fail_after(5):
                checks[name] = await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
            ready = False
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503)
