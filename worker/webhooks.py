"""The webhook dispatcher: sends the deliveries that job status changes wrote (service.crud.webhooks).

    job status change ──(same transaction)──► webhook_deliveries row (pending)
    dispatcher: claim a due row (compare-and-set) ─► POST, signed ─► record the attempt
                2xx: succeeded · anything else, a timeout or no connection: retried after
                base·2^(n-1) s (capped) until the retry window after the event has passed: failed

It runs in its own process — `qdpo worker` starts one beside the Celery worker, `qdpo dispatcher`
runs one alone — so a receiver that is slow or never answers costs a dispatcher thread, never a
job's time. Any number of dispatchers can share a database: a claim moves the row's
`next_attempt_at` past the attempt's timeout, so no other dispatcher takes it meanwhile, and one
that dies mid-send leaves it due again after that (at-least-once; the webhook-id stays the same, so
a receiver can drop a repeat). At most `PER_ENDPOINT` attempts go to one endpoint at once, so one
endpoint that hangs cannot take every thread.

Deliveries are signed the Standard Webhooks way: `webhook-id`, `webhook-timestamp` (of the attempt)
and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}" keyed by the secret>`.
Connections go through qdpo_core.outbound's guarded transport, so the deployment's outbound policy
(no loopback, link-local or private addresses unless the operator allows them) holds on the
address actually connected to; redirects are not followed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass

import httpx

from qdpo_core.outbound import GuardedTransport, OutboundPolicy, blocked_cause
from service.config import Settings
from service.crud import webhooks as webhooks_crud
from service.db import session_factory
from service.tables import WebhookDelivery, WebhookEndpoint, utcnow

log = logging.getLogger(__name__)

PER_ENDPOINT = 2  # attempts in flight to one endpoint, per dispatcher
LEASE_MARGIN_SECONDS = 30.0  # a claim outlasts the attempt's timeout by this much
BODY_EXCERPT = 200  # characters of a refusing receiver's answer kept in the attempt's record
USER_AGENT = "qdpo-webhooks/0.1"


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value for one attempt."""
    key = base64.b64decode(secret.removeprefix(webhooks_crud.SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def encode_body(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass
class Outcome:
    status_code: int | None
    error: str | None


class Dispatcher:
    """Claims due deliveries and sends them on a small pool of daemon threads.

    `run(stop)` loops until `stop` is set; `start()` / `stop()` run it on a thread of this process.
    """

    def __init__(self, settings: Settings, *, owner: str | None = None, policy: OutboundPolicy | None = None):
        self.settings = settings
        self.sessions = session_factory(settings.resolved_database_url)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:webhooks"
        self.policy = policy or settings.outbound_policy()
        self.timeout = settings.webhook_timeout_seconds
        self.concurrency = max(1, settings.webhook_concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        self.http = httpx.Client(
            transport=GuardedTransport(self.policy, limits=limits),
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
        )
        self._work: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # endpoint pk -> attempts being sent
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sender, name=f"qdpo-webhook-{n}", daemon=True) for n in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        self._loop: threading.Thread | None = None

    # --- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, parent_pid: int | None = None) -> None:
        stop = stop or self._stop
        log.info("webhook dispatcher %s: polling every %s s, %d senders", self.owner, self.settings.webhook_poll_seconds, self.concurrency)
        while not stop.is_set():
            started, full = 0, False
            try:
                started, full = self.run_once()
            except Exception:  # a database outage must not end the loop
                log.exception("webhook dispatcher pass failed")
            if parent_pid is not None and os.getppid() != parent_pid:
                log.info("webhook dispatcher: the process that started it is gone; stopping")
                break
            stop.wait(0.05 if started and full else self.settings.webhook_poll_seconds)

    def run_once(self) -> tuple[int, bool]:
        """Claim what is due and hand it to the senders. Returns (attempts started, whether every sender is busy)."""
        with self._lock:
            busy = sum(self._in_flight.values())
            saturated = {pk for pk, count in self._in_flight.items() if count >= PER_ENDPOINT}
        free = self.concurrency - busy
        if free <= 0:
            return 0, True
        started = 0
        with self.sessions() as session:
            for delivery, endpoint in webhooks_crud.due_deliveries(session, now=utcnow(), limit=free, skip_endpoints=saturated):
                with self._lock:
                    if self._in_flight.get(endpoint.pk, 0) >= PER_ENDPOINT:
                        continue
                attempt = webhooks_crud.claim(session, delivery=delivery, owner=self.owner, now=utcnow(), lease_seconds=self.timeout + LEASE_MARGIN_SECONDS)
                if attempt is None:
                    continue  # another dispatcher took it
                with self._lock:
                    self._in_flight[endpoint.pk] = self._in_flight.get(endpoint.pk, 0) + 1
                self._work.put((delivery, endpoint, attempt))
                started += 1
        return started, started >= free

    def _sender(self) -> None:
        while True:
            delivery, endpoint, attempt = self._work.get()
            try:
                self._attempt(delivery, endpoint, attempt)
            except Exception:
                log.exception("webhook delivery %s: attempt %d could not be recorded", delivery.id, attempt)
            finally:
                with self._lock:
                    self._in_flight[endpoint.pk] -= 1
                    if not self._in_flight[endpoint.pk]:
                        del self._in_flight[endpoint.pk]

    def _attempt(self, delivery: WebhookDelivery, endpoint: WebhookEndpoint, attempt: int) -> None:
        started, clock = utcnow(), time.monotonic()
        outcome = self.send(endpoint.url, endpoint.secret, delivery.id, delivery.payload)
        duration_ms = int((time.monotonic() - clock) * 1000)
        with self.sessions() as session:
            status = webhooks_crud.record_attempt(
                session,
                delivery=delivery,
                attempt=attempt,
                owner=self.owner,
                started=started,
                status_code=outcome.status_code,
                error=outcome.error,
                duration_ms=duration_ms,
                retry_base=self.settings.webhook_retry_base_seconds,
                retry_max_interval=self.settings.webhook_retry_max_interval_seconds,
                retry_window=self.settings.webhook_retry_window_seconds,
            )
        shown = outcome.status_code if outcome.error is None else outcome.error
        log.info("webhook %s (%s) attempt %d to endpoint %s: %s -> %s", delivery.id, delivery.event_type, attempt, endpoint.id, shown, status or "not recorded")

    # --- one HTTP attempt ----------------------------------------------------------------------

    def send(self, url: str, secret: str, msg_id: str, payload: dict) -> Outcome:
        body = encode_body(payload)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, msg_id, timestamp, body),
        }
        try:
            with self.http.stream("POST", url, content=body, headers=headers) as response:
                if 200 <= response.status_code < 300:
                    return Outcome(response.status_code, None)
                return Outcome(response.status_code, _refusal(response))
        except httpx.TimeoutException:
            return Outcome(None, f"timeout: no answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            blocked = blocked_cause(exc)
            if blocked is not None:
                return Outcome(None, f"url_not_allowed: {blocked.host} is a {blocked.reason}, which this deployment does not call")
            return Outcome(None, f"{type(exc).__name__}: {exc}"[:500])

    # --- in-process use (tests, embedding) -----------------------------------------------------

    def start(self) -> Dispatcher:
        self._loop = threading.Thread(target=self.run, name="qdpo-webhook-dispatcher", daemon=True)
        self._loop.start()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; wait up to `grace` seconds for attempts in flight (the rest are retried after their claim lapses)."""
        self._stop.set()
        if self._loop is not None:
            self._loop.join(self.settings.webhook_poll_seconds + 5)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._in_flight:
                    break
            time.sleep(0.05)
        self.http.close()


def _refusal(response: httpx.Response) -> str:
    if 300 <= response.status_code < 400:
        return f"HTTP {response.status_code}: redirects are not followed; register the final URL"
    excerpt = ""
    try:
        for chunk in response.iter_text():
            excerpt += chunk
            if len(excerpt) >= BODY_EXCERPT:
                break
    except httpx.HTTPError:
        pass
    excerpt = " ".join(excerpt.split())[:BODY_EXCERPT]
    return f"HTTP {response.status_code}" + (f": {excerpt}" if excerpt else "")
