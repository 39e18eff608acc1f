"""/v1/jobs: create, list, get, cancel and delete alignment jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

from api import metrics
from api.core.errors import ApiError
from api.core.responses import json_response
from api.deps import CurrentTenant, QueueDep, ReadsDep, SessionDep, SettingsDep, StoreDep, release
from api.jobspec import build_spec, job_public
from api.schemas.common import Deleted, Page, error_responses
from api.schemas.jobs import JobCreate, JobPublic, JobStatus
from service.crud import jobs as jobs_crud
from service.crud.pagination import checked_cursor, cursor_query, split_page
from service.dispatch import create_and_queue, validate_and_queue, withdraw
from service.errors import not_found
from service.inputs import resolve_inputs
from service.security import new_id
from service.tables import CANCELLED, TERMINAL_STATUSES, VALIDATING, Job

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _answer(session, body: BaseModel, status_code: int = 200) -> Response:
    """The route's last step, in its thread: the connection goes back to the pool and the body is serialized (api.deps)."""
    release(session)
    return json_response(body, status_code)


def get_tenant_job(session, tenant, job_id: str) -> Job:
    job = jobs_crud.get_job(session, tenant_id=tenant.id, job_id=job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.post("", status_code=201, response_model=JobPublic, responses=error_responses(401, 404, 413, 422))
def create_job(
    body: JobCreate,
    tenant: CurrentTenant,
    session: SessionDep,
    store: StoreDep,
    queue: QueueDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            pattern=r"^[\x20-\x7e]*$",
            description="Up to 255 printable ASCII characters. Retrying with the same key and the same body returns the job created the first time instead of a second one; the same key with a different body is refused (422).",
        ),
    ] = None,
) -> Response:
    """Create a job; it is validated completely, stored, and only then queued."""
    idempotency_key = idempotency_key or None  # an empty header is no key
    request = body.model_dump(exclude_none=True)
    if idempotency_key and (earlier := jobs_crud.find_by_idempotency_key(session, tenant_id=tenant.id, key=idempotency_key)):
        jobs_crud.check_idempotent_reuse(earlier, key=idempotency_key, request=request)
        return _answer(session, job_public(earlier), 200)
    spec, inputs = build_spec(body, outbound_policy=settings.outbound_policy())
    resolve_inputs(session, store, tenant_id=tenant.id, inputs=inputs)
    job = Job(
        id=new_id("job"),
        tenant_id=tenant.id,
        status=VALIDATING,
        model=body.model,
        method=spec["method"],
        spec=spec,
        inputs=inputs,
        request=request,
        request_sha256=jobs_crud.request_fingerprint(request),
        suffix=body.suffix,
        metadata_=body.metadata or {},
        idempotency_key=idempotency_key,
    )
    try:
        if inputs:  # committed as validating before its files are hashed once more, which can take a while
            jobs_crud.create_job(session, job=job)
        else:  # nothing to check: stored as queued and sent
            create_and_queue(session, queue=queue, job=job)
    except IntegrityError:  # the same idempotency key raced in from a parallel retry
        session.rollback()
        earlier = jobs_crud.find_by_idempotency_key(session, tenant_id=tenant.id, key=idempotency_key or "")
        if earlier is None:
            raise
        jobs_crud.check_idempotent_reuse(earlier, key=idempotency_key or "", request=request)
        return _answer(session, job_public(earlier), 200)
    if inputs:
        validate_and_queue(session, store=store, queue=queue, job=job)
    metrics.JOBS_CREATED.labels(method=job.method).inc()
    return _answer(session, job_public(job), 201)


@router.get("", response_model=Page[JobPublic], responses=error_responses(401, 422))
async def list_jobs(
    tenant: CurrentTenant,
    reads: ReadsDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    after: Annotated[str | None, Query(description="Cursor: the last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    """List your jobs, newest first."""
    cursor_pk = None
    if after is not None:  # awaited on the event loop, as GET of a job (api.deps)
        query = cursor_query(model=Job, after=after, tenant_id=tenant.id)
        row = await reads.first(*query) if query is not None else None
        cursor_pk = checked_cursor(row[0] if row is not None else None, after)
    rows = await reads.all(*jobs_crud.jobs_page_query(tenant_id=tenant.id, status=status, cursor_pk=cursor_pk, limit=limit))
    jobs, has_more = split_page(rows, limit)
    return json_response(Page[JobPublic](data=[job_public(j) for j in jobs], has_more=has_more, next_cursor=jobs[-1].id if has_more else None))


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 404))
async def get_job(job_id: str, tenant: CurrentTenant, reads: ReadsDep) -> Response:
    """Get a job: status, stage, progress with ETA, error, result."""
    query = jobs_crud.shown_job_query(tenant_id=tenant.id, job_id=job_id)  # awaited on the event loop: no thread (api.deps)
    job = await reads.first(*query) if query is not None else None
    if job is None:
        raise not_found("job", job_id)
    return json_response(job_public(job))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=error_responses(401, 404, 409))
def cancel_job(job_id: str, tenant: CurrentTenant, session: SessionDep, queue: QueueDep) -> JobPublic:
    """Cancel a job: at once if it has not started, else at the worker's next step (status cancelling)."""
    job = get_tenant_job(session, tenant, job_id)
    if job.status in ("succeeded", "failed"):
        raise ApiError(409, "job_finished", f"job_id: {job_id} already {job.status}; there is nothing to cancel", "job_id")
    was = job.status
    if jobs_crud.request_cancel(session, job=job) == CANCELLED and was != CANCELLED:
        withdraw(queue, job)  # it never started: its message must not hold up the jobs behind it
    return job_public(job)


@router.delete("/{job_id}", response_model=Deleted, responses=error_responses(401, 404, 409))
def delete_job(job_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep, queue: QueueDep) -> Deleted:
    """Delete a finished job with its events, checkpoints and artifacts."""
    job = get_tenant_job(session, tenant, job_id)
    if job.status not in TERMINAL_STATUSES:
        raise ApiError(409, "job_not_finished", f"job_id: {job_id} is {job.status}; cancel it first, then delete it", "job_id")
    relative = store.job_relpath(job.tenant_id, job.id)
    jobs_crud.delete_job(session, job=job)
    store.delete(relative)
    withdraw(queue, job)  # e.g. a retry message still waiting for a job that failed meanwhile
    return Deleted(id=job_id, object="job")
