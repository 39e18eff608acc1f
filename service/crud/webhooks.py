"""Webhook endpoints and their deliveries: registration, the outbox written with each job status
change, and the claims a dispatcher takes to send them.

A status change of a job (`service.crud.jobs`) calls `job_status_changed` in the same transaction:
one delivery row per endpoint of the job's tenant that subscribed to `job.<status>`. Nothing is
sent there. A dispatcher (`worker.webhooks`) claims due rows with a compare-and-set, sends them,
and records each attempt; a failed attempt is retried with exponential back-off within the
dispatcher's retry window. The delivery's id is the `webhook-id` of every attempt, so a receiver can
drop a repeat.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Set
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, bindparam, func, select, update
from sqlalchemy.orm import Session

from service.crud.events import storable
from service.errors import Conflict, InvalidInput
from service.security import looks_like_id, new_id
from service.tables import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_STATUSES,
    DELIVERY_SUCCEEDED,
    JOB_STATUSES,
    VALIDATING,
    Job,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)

# A job's status changes announce themselves as job.<status> (validating is where every job starts: no event).
EVENT_TYPES = tuple(f"job.{status}" for status in JOB_STATUSES if status != VALIDATING)
DEFAULT_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")
SECRET_PREFIX = "whsec_"
ATTEMPT_LOG_LIMIT = 50  # attempts kept per delivery (the latest)


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


# --- endpoints (API) ---------------------------------------------------------------------------


def create_endpoint(session: Session, *, tenant_id: str, url: str, events: list[str], description: str | None, limit: int) -> WebhookEndpoint:
    count = session.scalar(select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)) or 0
    if count >= limit:
        raise Conflict(
            f"this tenant already has {count} webhook endpoints, the most this deployment allows; delete one (DELETE /v1/webhooks/{{id}}) first",
            None,
            code="webhook_limit_reached",
        )
    endpoint = WebhookEndpoint(id=new_id("wh"), tenant_id=tenant_id, url=url, events=list(events), description=description, secret=new_secret())
    session.add(endpoint)
    session.commit()
    return endpoint


def get_endpoint(session: Session, *, tenant_id: str, webhook_id: str) -> WebhookEndpoint | None:
    if not looks_like_id(webhook_id, "wh"):
        return None
    return session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == webhook_id, WebhookEndpoint.tenant_id == tenant_id))


def list_endpoints(session: Session, *, tenant_id: str) -> list[WebhookEndpoint]:
    """Newest first (a tenant has at most `webhook_max_endpoints`, so one page holds them all)."""
    return list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id).order_by(WebhookEndpoint.pk.desc())))


def delete_endpoint(session: Session, *, endpoint: WebhookEndpoint) -> None:
    """The endpoint and its delivery records; an attempt in flight finds its row gone and is not recorded."""
    session.delete(endpoint)
    session.commit()


def list_deliveries(session: Session, *, endpoint: WebhookEndpoint, status: str | None, after: str | None, limit: int) -> tuple[list[WebhookDelivery], bool]:
    """An endpoint's deliveries, newest first, `after=<delivery id>` for the next page."""
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_pk == endpoint.pk)
    if status:
        assert status in DELIVERY_STATUSES
        query = query.where(WebhookDelivery.status == status)
    if after is not None:
        cursor = (
            session.scalar(select(WebhookDelivery.pk).where(WebhookDelivery.id == after, WebhookDelivery.endpoint_pk == endpoint.pk))
            if looks_like_id(after, "msg")
            else None
        )
        if cursor is None:
            raise InvalidInput(f"after: {after[:80]!r} is not a delivery id from a previous page of this list", "after", code="invalid_cursor")
        query = query.where(WebhookDelivery.pk < cursor)
    rows = list(session.scalars(query.order_by(WebhookDelivery.pk.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# --- the outbox (written with each job status change) ------------------------------------------


def _epoch(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def job_event_payload(row, event_type: str, at: datetime) -> dict:
    """The body receivers get (Standard Webhooks shape: type, timestamp, data). Names no server path."""
    report = row.report or {}
    adapter = None
    if row.adapter_sha256:
        adapter = {"bytes": row.adapter_bytes, "sha256": row.adapter_sha256, "url": f"/v1/jobs/{row.id}/adapter"}
    data = {
        "object": "job",
        "id": row.id,
        "status": row.status,
        "stage": row.stage,
        "model": row.model,
        "method": row.method,
        "quantization": (row.spec or {}).get("quantization"),
        "suffix": row.suffix,
        "metadata": row.metadata_ or {},
        "error": row.error,
        "fine_tuned_model": row.fine_tuned_model,
        "adapter": adapter,
        "gap_closed": report.get("gap_closed"),
        "attempts": row.attempts,
        "created_at": _epoch(row.created_at),
        "finished_at": _epoch(row.finished_at),
    }
    return {"type": event_type, "timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "data": data}


# The endpoints of a job's tenant, asked on every status change of every job: one query, built once.
_ENDPOINTS_OF_JOB = select(WebhookEndpoint).join(Job, Job.tenant_id == WebhookEndpoint.tenant_id).where(Job.pk == bindparam("job_pk_"))


def job_status_changed(session: Session, *, job_pk: int, status: str) -> int:
    """Queue `job.<status>` for every endpoint of the job's tenant that subscribed to it, in the caller's
    transaction (so the deliveries exist exactly when the status change does). Returns how many."""
    event_type = f"job.{status}"
    if event_type not in EVENT_TYPES:
        return 0
    endpoints = [e for e in session.scalars(_ENDPOINTS_OF_JOB, {"job_pk_": job_pk}) if event_type in (e.events or [])]
    if not endpoints:
        return 0
    # Read the row as the status change left it (a Core select: the session's identity map may hold an older copy).
    job = session.execute(
        select(
            Job.id,
            Job.status,
            Job.stage,
            Job.model,
            Job.method,
            Job.spec,
            Job.suffix,
            Job.metadata_,
            Job.error,
            Job.fine_tuned_model,
            Job.report,
            Job.adapter_bytes,
            Job.adapter_sha256,
            Job.attempts,
            Job.created_at,
            Job.finished_at,
        ).where(Job.pk == job_pk)
    ).one()
    now = utcnow()
    payload = job_event_payload(job, event_type, now)
    for endpoint in endpoints:
        session.add(
            WebhookDelivery(
                id=new_id("msg"),
                endpoint_pk=endpoint.pk,
                event_type=event_type,
                job_id=job.id,
                payload=payload,
                status=DELIVERY_PENDING,
                attempts=0,
                attempt_log=[],
                next_attempt_at=now,
                created_at=now,
            )
        )
    return len(endpoints)


# --- dispatcher side ---------------------------------------------------------------------------


def due_deliveries(session: Session, *, now: datetime, limit: int, skip_endpoints: Set[int] = frozenset()) -> list[tuple[WebhookDelivery, WebhookEndpoint]]:
    """Pending deliveries whose next attempt is due, oldest due first, with their endpoints."""
    query = (
        select(WebhookDelivery, WebhookEndpoint)
        .join(WebhookEndpoint, WebhookEndpoint.pk == WebhookDelivery.endpoint_pk)
        .where(WebhookDelivery.status == DELIVERY_PENDING, WebhookDelivery.next_attempt_at <= now)
    )
    if skip_endpoints:
        query = query.where(WebhookDelivery.endpoint_pk.not_in(skip_endpoints))
    rows = session.execute(query.order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.pk).limit(limit)).all()
    session.commit()  # end the read (the rows stay loaded: sessions do not expire on commit)
    return [(row[0], row[1]) for row in rows]


def claim(session: Session, *, delivery: WebhookDelivery, owner: str, now: datetime, lease_seconds: float) -> int | None:
    """Take the delivery for one attempt: pending, due and not taken since it was read. Returns the attempt's number."""
    attempt = delivery.attempts + 1
    statement = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.pk == delivery.pk,
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDelivery.attempts == delivery.attempts,
            WebhookDelivery.next_attempt_at <= now,
        )
        .values(attempts=attempt, claimed_by=owner, next_attempt_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    claimed = cast(CursorResult[Any], session.execute(statement)).rowcount == 1  # an UPDATE answers with a CursorResult
    session.commit()
    return attempt if claimed else None


def retry_delay(attempt: int, base: float, maximum: float) -> float:
    """Seconds before the attempt after `attempt` (1-based): base, 2·base, 4·base, … capped at maximum."""
    return min(base * 2 ** (attempt - 1), maximum)


def record_attempt(
    session: Session,
    *,
    delivery: WebhookDelivery,
    attempt: int,
    owner: str,
    started: datetime,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
    retry_base: float,
    retry_max_interval: float,
    retry_window: float,
) -> str | None:
    """Write the attempt's outcome (only while the claim is still ours); returns the delivery's new status."""
    now = utcnow()
    entry = {"attempt": attempt, "at": round(started.timestamp(), 3), "status_code": status_code, "error": None, "duration_ms": duration_ms}
    succeeded = error is None and status_code is not None and 200 <= status_code < 300
    error = storable(error[:500]) if error else None  # may quote what the receiver answered
    entry["error"] = error
    log = (list(delivery.attempt_log or []) + [entry])[-ATTEMPT_LOG_LIMIT:]
    values: dict = {"attempt_log": log, "last_status_code": status_code, "last_error": error, "claimed_by": None}
    if succeeded:
        values.update(status=DELIVERY_SUCCEEDED, delivered_at=now, next_attempt_at=now)
    else:
        next_at = now + timedelta(seconds=retry_delay(attempt, retry_base, retry_max_interval))
        created = delivery.created_at if delivery.created_at.tzinfo else delivery.created_at.replace(tzinfo=now.tzinfo)  # SQLite keeps no zone
        gives_up = next_at > created + timedelta(seconds=retry_window)
        values.update(status=DELIVERY_FAILED if gives_up else DELIVERY_PENDING, next_attempt_at=next_at)
    statement = (
        update(WebhookDelivery)
        .where(and_(WebhookDelivery.pk == delivery.pk, WebhookDelivery.attempts == attempt, WebhookDelivery.claimed_by == owner))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    recorded = cast(CursorResult[Any], session.execute(statement)).rowcount == 1
    session.commit()
    if recorded:
        delivery.attempt_log = log
        delivery.attempts = attempt
    return values["status"] if recorded else None
