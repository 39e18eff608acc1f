"""Prometheus metrics of the API process, served at /metrics.

Request counts and latencies per route template (not per raw path, so ids do not explode the
label space), plus job and file counters. Job counts by status are read from the database at
scrape time, so they are right even with several API processes.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from starlette.types import ASGIApp, Receive, Scope, Send

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("qdpo_http_requests_total", "HTTP requests answered.", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("qdpo_http_request_duration_seconds", "Time to answer an HTTP request.", ["method", "route"], registry=REGISTRY)
JOBS_CREATED = Counter("qdpo_jobs_created_total", "Jobs accepted by the API.", ["method"], registry=REGISTRY)
FILES_UPLOADED = Counter("qdpo_files_uploaded_total", "Dataset files accepted.", ["purpose"], registry=REGISTRY)


class JobStatusCollector:
    """qdpo_jobs{status=…}: jobs per status, counted in the database when scraped."""

    def __init__(self, sessions):
        self.sessions = sessions

    def collect(self):
        from service.tables import JOB_STATUSES, Job

        gauge = GaugeMetricFamily("qdpo_jobs", "Jobs per status (all tenants).", labels=["status"])
        try:
            with self.sessions() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        except Exception:
            return
        for status in JOB_STATUSES:
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge


def route_template(scope: Scope) -> str:
    """'/v1/jobs/{job_id}/events' for '/v1/jobs/job_41d…/events' (an included router's route knows
    only its own part of the path; the router prefixes are the leading segments of the real path)."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template is None:
        return "unmatched"
    actual = scope["path"].rstrip("/").split("/")
    own = template.rstrip("/").split("/")
    return "/".join(actual[: len(actual) - len(own) + 1]) + template if len(actual) > len(own) else template


class MetricsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def record_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            template = route_template(scope)
            REQUESTS.labels(scope["method"], template, str(status["code"])).inc()
            LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)
