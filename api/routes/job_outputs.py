"""What a job produces: events (paged or streamed), metrics, checkpoints, report and adapter."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.core.errors import ApiError
from api.deps import CurrentTenant, SessionDep, StoreDep
from api.routes.jobs import get_tenant_job
from api.schemas.common import Page, error_responses
from api.schemas.jobs import CheckpointList, CheckpointPublic, EventPublic, MetricList, MetricPublic
from service.crud import events as events_crud
from service.tables import SUCCEEDED, TERMINAL_STATUSES, Job, JobEvent

router = APIRouter(prefix="/jobs/{job_id}", tags=["job outputs"])
STREAM_BATCH = 200


def event_public(event: JobEvent) -> EventPublic:
    return EventPublic(
        id=events_crud.event_public_id(event.seq),
        created_at=event.created_at.timestamp(),
        type=event.type,
        stage=event.stage,
        level=event.level,
        message=event.message,
        step=event.step,
        total=event.total,
        data=event.data or {},
    )


def _wants_stream(request: Request, stream: bool) -> bool:
    return stream or "text/event-stream" in request.headers.get("accept", "")


@router.get(
    "/events",
    response_model=Page[EventPublic],
    responses={
        200: {"content": {"text/event-stream": {"description": "With `stream=true` or `Accept: text/event-stream`: one SSE message per event, then `end`."}}},
        **error_responses(401, 404, 422),
    },
)
def list_events(
    job_id: str,
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    after: Annotated[str | None, Query(description="Only events after this id (e.g. the last one you saw).")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    type: Annotated[list[Literal["status", "stage", "metrics", "checkpoint", "log"]] | None, Query(description="Only these event types (repeatable).")] = None,
    stream: Annotated[bool, Query(description="Stream events live as server-sent events until the job ends.")] = False,
    last_event_id: Annotated[str | None, Header(description="SSE reconnect: continue after this event id.")] = None,
):
    """A job's events, oldest first: paged with `after`, or streamed live (SSE)."""
    job = get_tenant_job(session, tenant, job_id)
    if after is not None:
        after_seq = events_crud.parse_event_cursor(after, "after")
    else:  # an SSE client reconnecting sends the last id it saw as a header
        after_seq = events_crud.parse_event_cursor(last_event_id if _wants_stream(request, stream) else None, "Last-Event-ID")
    if _wants_stream(request, stream):
        return EventSourceResponse(_event_stream(request, job.pk, after_seq, type), ping=15)
    events, has_more = events_crud.list_events(session, job_pk=job.pk, after_seq=after_seq, limit=limit, types=type)
    data = [event_public(e) for e in events]
    return Page[EventPublic](data=data, has_more=has_more, next_cursor=data[-1].id if has_more else None)


async def _event_stream(request: Request, job_pk: int, after_seq: int, types: Sequence[str] | None):
    """Poll the database and forward new events; finish once the job is over and drained."""
    sessions, poll = request.app.state.sessions, request.app.state.settings.event_stream_poll_seconds

    def fetch(cursor: int) -> tuple[list[EventPublic], str | None]:
        with sessions() as session:
            job = session.get(Job, job_pk)
            if job is None:  # deleted while someone was following it
                return [], "deleted"
            events, _ = events_crud.list_events(session, job_pk=job_pk, after_seq=cursor, limit=STREAM_BATCH, types=types)
            return [event_public(e) for e in events], job.status

    cursor = after_seq
    while not await request.is_disconnected():
        events, status = await anyio.to_thread.run_sync(fetch, cursor)
        for event in events:
            cursor = int(event.id.removeprefix(events_crud.EVENT_PREFIX))
            yield ServerSentEvent(data=event.model_dump_json(), event=event.type, id=event.id)
        if not events and (status in TERMINAL_STATUSES or status == "deleted"):
            yield ServerSentEvent(data=json.dumps({"status": status}), event="end")
            return
        if len(events) < STREAM_BATCH:
            await asyncio.sleep(poll)


@router.get("/metrics", response_model=MetricList, responses=error_responses(401, 404))
def list_metrics(job_id: str, tenant: CurrentTenant, session: SessionDep) -> MetricList:
    """Training metrics per optimizer step: loss, rewards, reward margin and accuracy, learning rate."""
    job = get_tenant_job(session, tenant, job_id)
    rows = events_crud.list_metrics(session, job_pk=job.pk)
    return MetricList(data=[MetricPublic(step=r.step, total_steps=r.total_steps, values=r.values) for r in rows])


@router.get("/checkpoints", response_model=CheckpointList, responses=error_responses(401, 404))
def list_checkpoints(job_id: str, tenant: CurrentTenant, session: SessionDep) -> CheckpointList:
    """Training checkpoints with their held-out metrics; `is_best` marks the one exported."""
    job = get_tenant_job(session, tenant, job_id)
    rows = events_crud.list_checkpoints(session, job_pk=job.pk)
    return CheckpointList(data=[CheckpointPublic(step=r.step, metrics=r.metrics, is_best=r.is_best, created_at=int(r.created_at.timestamp())) for r in rows])


def _require_success(job: Job, what: str) -> None:
    if job.status != SUCCEEDED:
        hint = "it exists once the job succeeded" if job.status not in TERMINAL_STATUSES else "the job did not succeed, so there is none"
        raise ApiError(409, f"{what}_not_ready", f"job_id: {job.id} is {job.status}; {hint}", "job_id")


@router.get(
    "/report",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "fp": {},
                        "ptq": {"token_flip_rate": 0.689, "kl": 2.48},
                        "aligned": {"token_flip_rate": 0.452, "kl": 0.95},
                        "gap_closed": {"token_flip_rate": 0.34},
                        "selected_checkpoint": 60,
                    }
                },
                "text/markdown": {},
            }
        },
        **error_responses(401, 404, 409),
    },
)
def get_report(job_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep, format: Annotated[Literal["json", "markdown"], Query()] = "json"):
    """The evaluation report: full precision vs quantized vs aligned, and how much of the gap closed."""
    job = get_tenant_job(session, tenant, job_id)
    _require_success(job, "report")
    if format == "markdown":
        path = store.report_markdown(job.tenant_id, job.id)
        return PlainTextResponse(path.read_text(encoding="utf-8") if path.is_file() else "", media_type="text/markdown")
    return job.report


@router.head("/adapter", include_in_schema=False)
@router.get(
    "/adapter",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/gzip": {}},
            "description": "tar.gz of adapter/ (PEFT), manifest.json, report.json, report.md. ETag and Repr-Digest carry its sha256.",
        },
        **error_responses(401, 404, 409),
    },
)
def download_adapter(job_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep) -> FileResponse:
    """Download the trained adapter as one archive (Content-Length, sha256 in ETag and Repr-Digest)."""
    job = get_tenant_job(session, tenant, job_id)
    _require_success(job, "adapter")
    assert job.adapter_sha256 is not None and job.adapter_path is not None  # a succeeded job has its adapter
    digest = base64.b64encode(bytes.fromhex(job.adapter_sha256)).decode()
    headers = {"ETag": f'"{job.adapter_sha256}"', "Repr-Digest": f"sha-256=:{digest}:", "X-Content-SHA256": job.adapter_sha256}
    filename = f"{job.id}-adapter.tar.gz"
    return FileResponse(store.absolute(job.adapter_path), media_type="application/gzip", filename=filename, headers=headers)


GGUF_DESCRIPTION = (
    "`quantization.method: gguf` jobs: `adapter` is the GGUF LoRA adapter (adapter.gguf), `model` the quantized base it was trained on "
    "(model-<TYPE>.gguf; a job that aligned a registered GGUF file has none to serve: that file is the user's own). "
    "Run the pair with `llama-cli -m model-Q4_0.gguf --lora adapter.gguf`. ETag and Repr-Digest carry the sha256 the manifest records."
)


@router.head("/gguf/{kind}", include_in_schema=False)
@router.get(
    "/gguf/{kind}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": GGUF_DESCRIPTION}, **error_responses(401, 404, 409, 422)},
)
def download_gguf(job_id: str, kind: Literal["adapter", "model"], tenant: CurrentTenant, session: SessionDep, store: StoreDep) -> FileResponse:
    """Download a GGUF job's llama.cpp files: the LoRA adapter, or the quantized model it belongs to."""
    job = get_tenant_job(session, tenant, job_id)
    _require_success(job, "gguf")
    export_dir = store.workdir(job.tenant_id, job.id) / "export"  # the pipeline's export, which the adapter archive was built from
    manifest_path = export_dir / "manifest.json"
    gguf = (json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}).get("gguf")
    if not gguf:
        raise ApiError(409, "gguf_not_available", f"job_id: {job.id} made no GGUF files; jobs with quantization.method 'gguf' make them", "job_id")
    entry = gguf["adapter"] if kind == "adapter" else gguf["base"]
    if not entry.get("included", True):
        raise ApiError(
            409,
            "gguf_model_not_included",
            f"kind: job {job.id} aligned the registered GGUF file {entry['file']} (sha256 {entry['sha256']}) as it is, so there is no model to download; "
            "use that file with GET .../gguf/adapter",
            "kind",
        )
    digest = base64.b64encode(bytes.fromhex(entry["sha256"])).decode()
    headers = {"ETag": f'"{entry["sha256"]}"', "Repr-Digest": f"sha-256=:{digest}:", "X-Content-SHA256": entry["sha256"]}
    return FileResponse(export_dir / entry["file"], media_type="application/octet-stream", filename=entry["file"], headers=headers)
