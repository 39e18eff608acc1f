"""The FastAPI application. `uvicorn api.main:app` serves it; tests call `create_app(settings)`.

Importing this module loads no torch and opens no connection: the database engine, the broker
connection and the reconciler start with the application's lifespan.
"""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api import metrics
from api.core.errors import install_error_handlers
from api.core.limits import BodySizeLimitMiddleware
from api.core.query import EmptyQueryValuesMiddleware
from api.deps import install_request_state
from api.routes import API_PREFIX, dashboard, health, resource_routers
from service.broker import JobQueue
from service.config import Settings, get_settings
from service.db import session_factory
from service.reconciler import ReconcilerThread
from service.storage import ArtifactStore

log = logging.getLogger(__name__)

DESCRIPTION = """
Alignment-as-a-service for quantized LLMs. Upload prompts or preference pairs, create a job
(base model, quantization, method: qdpo | dpo | kd | …), follow its events and metrics, then
download the trained LoRA adapter and its before/after evaluation report.

Authenticate with `Authorization: Bearer <key>` (keys: `qdpo keys create --tenant NAME`).
Errors always look like `{"error": {"code", "message", "param"}}`; `param` names the field at fault.
"""

TAGS = [
    {"name": "files", "description": "Dataset files (JSONL), validated line by line on upload."},
    {"name": "jobs", "description": "Alignment jobs and their lifecycle."},
    {"name": "job outputs", "description": "Events, metrics, checkpoints, report and adapter of a job."},
    {"name": "models", "description": "Base models this deployment offers."},
    {"name": "webhooks", "description": "Endpoints that receive signed job events, and the deliveries made to them."},
    {"name": "health", "description": "Probes for orchestrators."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.register_models()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        reconciler = None
        if settings.reconcile_interval_seconds > 0:
            reconciler = ReconcilerThread(settings, app.state.queue, settings.reconcile_interval_seconds)
            reconciler.start()
        app.state.reads.open()
        try:
            yield
        finally:
            await app.state.reads.close()
            if reconciler is not None:
                reconciler.stop()

    app = FastAPI(title="qdpo", version="0.1.0", description=DESCRIPTION, openapi_tags=TAGS, lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = session_factory(settings.resolved_database_url, settings.database_options())
    install_request_state(app, settings)
    app.state.store = ArtifactStore(settings.resolved_artifact_dir)
    app.state.queue = JobQueue(settings)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_upload_bytes=settings.max_upload_bytes, max_request_bytes=settings.max_request_bytes)
    app.add_middleware(EmptyQueryValuesMiddleware)
    app.include_router(health.router)
    app.include_router(dashboard.router)  # the web dashboard at /
    for router in resource_routers:
        app.include_router(router, prefix=API_PREFIX)
    if settings.metrics_enabled:
        _add_metrics(app)
    _document_error_bodies(app)
    return app


def create_served_app(settings: Settings | None = None) -> FastAPI:
    """The app of a process that does nothing but serve it (`qdpo api` and each of its workers, `qdpo serve`).

    What the process has built by now (modules, the app, its routes and schemas) lives as long as
    the process; a full garbage collection walked all of it, pausing the process 50-60 ms at a time
    under load on 2 cores, and those pauses were the slowest 1% of requests. `gc.freeze` moves it to
    a permanent generation, so collections only look at objects made since. Not done in
    `create_app`: an app inside a process that goes on doing other work (tests, a program that
    embeds the app) would pin that process's objects for good.
    """
    app = create_app(settings)
    gc.collect()
    gc.freeze()
    return app


def _document_error_bodies(app: FastAPI) -> None:
    """Every 422 in the OpenAPI document has the error envelope the API really sends.

    FastAPI documents its own validation body ({"detail": [...]}) for any route with parameters;
    api.core.errors answers {"error": {"code", "message", "param"}} instead.
    """
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            envelope = {"$ref": "#/components/schemas/ErrorBody"}
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if "HTTPValidationError" in str(responses.get("422", "")):
                        responses["422"] = {"description": "Invalid input; `param` names the field.", "content": {"application/json": {"schema": envelope}}}
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        assert app.openapi_schema is not None  # generate() stores the schema it returns
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_metrics(app: FastAPI) -> None:
    app.add_middleware(metrics.MetricsMiddleware)
    job_registry = CollectorRegistry(auto_describe=False)
    job_registry.register(metrics.JobStatusCollector(app.state.sessions))

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.REGISTRY) + generate_latest(job_registry), media_type=CONTENT_TYPE_LATEST)


def __getattr__(name: str):
    # `uvicorn api.main:app`: built on first access so that importing the module has no side effects.
    if name == "app":
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(name)
