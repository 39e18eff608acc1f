"""/v1/webhooks: endpoints a tenant registers for job events, and the deliveries made to them.

Every change of a job's status (`job.queued`, `job.running`, `job.succeeded`, …) is POSTed to each
of the tenant's endpoints that subscribed to it, signed per Standard Webhooks (`webhook-id`,
`webhook-timestamp`, `webhook-signature`), by a dispatcher beside the workers; failures and
timeouts are retried with exponential back-off for a bounded time, and every attempt is recorded.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Query

from api.core.errors import ApiError
from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.schemas.common import Deleted, Page, error_responses
from api.schemas.webhooks import DeliveryAttempt, DeliveryPublic, DeliveryStatus, WebhookCreate, WebhookCreated, WebhookPublic
from qdpo_core.errors import QdpoError
from service.crud import webhooks as webhooks_crud
from service.errors import not_found
from service.tables import DELIVERY_PENDING, WebhookDelivery, WebhookEndpoint

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def _epoch(value) -> int | None:
    return int(value.timestamp()) if value is not None else None


def webhook_public(endpoint: WebhookEndpoint) -> WebhookPublic:
    return WebhookPublic(
        id=endpoint.id, url=endpoint.url, events=list(endpoint.events or []), description=endpoint.description, created_at=_epoch(endpoint.created_at)
    )


def delivery_public(delivery: WebhookDelivery, endpoint: WebhookEndpoint) -> DeliveryPublic:
    return DeliveryPublic(
        id=delivery.id,
        webhook_id=endpoint.id,
        event_type=delivery.event_type,
        job_id=delivery.job_id,
        status=delivery.status,
        attempts=delivery.attempts,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        next_attempt_at=_epoch(delivery.next_attempt_at) if delivery.status == DELIVERY_PENDING else None,
        created_at=_epoch(delivery.created_at),
        delivered_at=_epoch(delivery.delivered_at),
        attempt_log=[DeliveryAttempt(**entry) for entry in delivery.attempt_log or []],
        payload=delivery.payload or {},
    )


def check_webhook_url(url: str, settings) -> str:
    """An http(s) URL with a host that this deployment may call; 422 naming `url` otherwise."""
    if _UNSAFE.search(url):
        raise ApiError(422, "invalid_url", "url: contains a space or a control character; percent-encode it", "url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number from 0 to 65535)
    except ValueError as exc:
        raise ApiError(422, "invalid_url", f"url: not a valid URL ({exc})", "url") from None
    if parts.scheme not in ("http", "https"):
        raise ApiError(422, "invalid_url", f"url: use an http:// or https:// URL; got {parts.scheme + ':' if parts.scheme else 'no scheme'}", "url")
    if not parts.hostname:
        raise ApiError(422, "invalid_url", "url: has no host name; use e.g. https://example.com/hooks/qdpo", "url")
    if parts.username is not None or parts.password is not None:
        raise ApiError(422, "invalid_url", "url: must not carry a user name or password; receivers authenticate deliveries by their signature", "url")
    try:
        settings.outbound_policy().check_url(url, "url")
    except QdpoError as exc:  # url_not_allowed (private, loopback, link-local …) or url_unresolvable
        raise ApiError(422, exc.code, exc.message, exc.param) from exc
    return url


def get_tenant_endpoint(session, tenant, webhook_id: str) -> WebhookEndpoint:
    endpoint = webhooks_crud.get_endpoint(session, tenant_id=tenant.id, webhook_id=webhook_id)
    if endpoint is None:
        raise not_found("webhook", webhook_id)
    return endpoint


@router.post("", status_code=201, response_model=WebhookCreated, responses=error_responses(401, 409, 413, 422))
def create_webhook(body: WebhookCreate, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep) -> WebhookCreated:
    """Register an endpoint. The answer carries its signing secret, which is never shown again."""
    url = check_webhook_url(body.url, settings)
    endpoint = webhooks_crud.create_endpoint(
        session, tenant_id=tenant.id, url=url, events=body.events, description=body.description, limit=settings.webhook_max_endpoints
    )
    return WebhookCreated(**webhook_public(endpoint).model_dump(), secret=endpoint.secret)


@router.get("", response_model=Page[WebhookPublic], responses=error_responses(401))
def list_webhooks(tenant: CurrentTenant, session: SessionDep) -> Page[WebhookPublic]:
    """Your endpoints, newest first (secrets are not shown)."""
    return Page[WebhookPublic](data=[webhook_public(e) for e in webhooks_crud.list_endpoints(session, tenant_id=tenant.id)], has_more=False)


@router.get("/{webhook_id}", response_model=WebhookPublic, responses=error_responses(401, 404))
def get_webhook(webhook_id: str, tenant: CurrentTenant, session: SessionDep) -> WebhookPublic:
    """One of your endpoints: its URL, events and description (the secret is not shown again)."""
    return webhook_public(get_tenant_endpoint(session, tenant, webhook_id))


@router.delete("/{webhook_id}", response_model=Deleted, responses=error_responses(401, 404))
def delete_webhook(webhook_id: str, tenant: CurrentTenant, session: SessionDep) -> Deleted:
    """Delete an endpoint and its delivery records; nothing more is sent to it."""
    endpoint = get_tenant_endpoint(session, tenant, webhook_id)
    webhooks_crud.delete_endpoint(session, endpoint=endpoint)
    return Deleted(id=webhook_id, object="webhook_endpoint")


@router.get("/{webhook_id}/deliveries", response_model=Page[DeliveryPublic], responses=error_responses(401, 404, 422))
def list_deliveries(
    webhook_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    status: Annotated[DeliveryStatus | None, Query(description="Only deliveries in this state.")] = None,
    after: Annotated[str | None, Query(description="Cursor: the last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[DeliveryPublic]:
    """What was sent to this endpoint, newest first: each delivery with every attempt's status code or error."""
    endpoint = get_tenant_endpoint(session, tenant, webhook_id)
    rows, has_more = webhooks_crud.list_deliveries(session, endpoint=endpoint, status=status, after=after, limit=limit)
    data = [delivery_public(d, endpoint) for d in rows]
    return Page[DeliveryPublic](data=data, has_more=has_more, next_cursor=data[-1].id if has_more else None)
