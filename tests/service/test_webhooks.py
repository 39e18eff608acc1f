"""Webhooks against real receivers: a local HTTP server started by the test, the real API on Postgres,
and dispatchers that really send — in the worker's own process set (`qdpo worker` starts one) for a
job that really runs, and in this process where a test needs short timeouts.

What must hold: a status change is delivered, signed so that it verifies (with our helper and with
the reference `standardwebhooks` implementation); failures and timeouts are retried with back-off,
with the same webhook-id, for a bounded time; a receiver that never answers neither slows the job
nor holds up other endpoints; another tenant never sees any of it.
"""

from __future__ import annotations

import copy
import secrets
import time
from datetime import datetime, timezone

import pytest
import standardwebhooks
from webhook_receiver import WebhookReceiver

from qdpo_client import AsyncClient, NotFoundError, WebhookVerificationError, sign_webhook, verify_webhook

from .conftest import TINY_JOB, _deployment, _teardown
from .helpers import error_of, raw
from .infra import WorkerProcess, wait_for

pytestmark = pytest.mark.service

HANG_TIMEOUT = 300.0  # the worker deployment's attempt timeout: far longer than the whole tiny job takes, even on a busy machine


# --- a job run by a real worker, with four receivers -------------------------------------------


@pytest.fixture(scope="module")
def hooks_worker(tmp_path_factory, tiny_model_dir):
    overrides = {
        "extra_models": {"tiny": str(tiny_model_dir)},
        "lease_seconds": 10,
        "heartbeat_seconds": 1,
        "cancel_poll_seconds": 0.3,
        "outbound_allowed_networks": "127.0.0.0/8",  # the receivers live on loopback (a string: the environment form)
        "webhook_timeout_seconds": HANG_TIMEOUT,
        "webhook_retry_base_seconds": 0.5,
        "webhook_poll_seconds": 0.2,
    }
    deployment, cleanup = _deployment("hooks", tmp_path_factory, overrides)
    deployment.worker = WorkerProcess(deployment.env, tmp_path_factory.mktemp("hooks-worker-log") / "worker.log").start()
    yield deployment
    _teardown([lambda: deployment.worker.stop(), *cleanup])


@pytest.fixture(scope="module")
def delivered(hooks_worker):
    """Tenant A registers ok / flaky / hanging endpoints, tenant B one for everything; A runs a tiny job."""
    b_key = hooks_worker.new_key(f"tenant-b-{secrets.token_hex(3)}")
    with WebhookReceiver() as receiver, hooks_worker.client() as alice, hooks_worker.client(b_key) as bob:
        ok = alice.webhooks.create(receiver.url("/ok"), events=["job.succeeded"], description="ok")
        flaky = alice.webhooks.create(receiver.url("/flaky"), events=["job.succeeded"])
        hang = alice.webhooks.create(receiver.url("/hang"), events=["job.running", "job.succeeded"])
        spy = bob.webhooks.create(receiver.url("/ok/tenant-b"), events=["job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled"])
        job = alice.jobs.create(**copy.deepcopy(TINY_JOB))
        finished = alice.jobs.wait(job.id, poll_interval=0.2, timeout=600, progress=False)

        def settled(endpoint):
            page = alice.webhooks.deliveries(endpoint.id)
            return page.data and all(d.status == "succeeded" for d in page.data) and page

        wait_for(lambda: settled(ok) and settled(flaky), 60, what="the ok and flaky deliveries")
        time.sleep(2)  # time for any duplicate to show up
        yield {
            "receiver": receiver,
            "alice": alice,
            "bob": bob,
            "job": finished,
            "endpoints": {"ok": ok, "flaky": flaky, "hang": hang, "spy": spy},
            "report": alice.jobs.report(job.id),
        }


def test_a_succeeded_job_delivers_one_signed_event_that_verifies(delivered, hooks_worker):
    receiver, job, ok = delivered["receiver"], delivered["job"], delivered["endpoints"]["ok"]
    (request,) = receiver.requests("/ok")  # exactly one
    assert ok.secret.startswith("whsec_")
    event = verify_webhook(request.body, request.headers, ok.secret)
    assert standardwebhooks.Webhook(ok.secret).verify(request.body, request.headers) == event  # the reference implementation agrees
    assert event["type"] == "job.succeeded"
    assert event["data"]["id"] == job.id and event["data"]["status"] == "succeeded"
    assert event["data"]["fine_tuned_model"] == job.fine_tuned_model
    assert event["data"]["adapter"]["sha256"] == job.adapter.sha256
    assert event["data"]["gap_closed"] == delivered["report"]["gap_closed"]
    assert request.headers["content-type"] == "application/json"
    assert abs(int(request.headers["webhook-timestamp"]) - request.at) < 5
    # nothing in it names a server path
    assert str(hooks_worker.settings.resolved_artifact_dir).encode() not in request.body and b"/tmp" not in request.body
    # the record says what happened, under the webhook-id the receiver saw
    (record,) = delivered["alice"].webhooks.deliveries(ok.id).data
    assert (record.id, record.event_type, record.job_id, record.status, record.attempts, record.last_status_code) == (
        request.webhook_id,
        "job.succeeded",
        job.id,
        "succeeded",
        1,
        204,
    )
    assert record.payload == event
    # a forged or altered delivery does not verify
    with pytest.raises(WebhookVerificationError):
        verify_webhook(request.body.replace(b"succeeded", b"failed"), request.headers, ok.secret)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(request.body, request.headers, delivered["endpoints"]["flaky"].secret)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify_webhook(request.body, request.headers, ok.secret, now=request.at + 600)  # a replay ten minutes later


def test_a_receiver_that_fails_twice_gets_three_attempts_with_one_webhook_id(delivered):
    receiver, flaky = delivered["receiver"], delivered["endpoints"]["flaky"]
    requests = receiver.requests("/flaky")
    assert len(requests) == 3
    assert len({r.webhook_id for r in requests}) == 1
    for request in requests:  # each attempt is signed afresh (its own timestamp) and verifies
        assert verify_webhook(request.body, request.headers, flaky.secret)["type"] == "job.succeeded"
    first_gap, second_gap = requests[1].at - requests[0].at, requests[2].at - requests[1].at
    assert first_gap >= 0.45 and second_gap >= 0.95, (first_gap, second_gap)  # back-off: 0.5 s, then 1 s
    (record,) = delivered["alice"].webhooks.deliveries(flaky.id).data
    assert record.id == requests[0].webhook_id and record.status == "succeeded" and record.attempts == 3
    assert [a["status_code"] for a in record.attempt_log] == [500, 500, 204]
    assert record.attempt_log[0]["error"] == "HTTP 500: receiver broken"


def test_a_receiver_that_never_answers_does_not_slow_the_job(delivered):
    receiver, job, hang = delivered["receiver"], delivered["job"], delivered["endpoints"]["hang"]
    running = [r for r in receiver.requests("/hang") if b'"job.running"' in r.body]
    assert running, "the job.running event was never sent"
    # The job finished while the first attempt to announce that it was running was still waiting for
    # an answer (it waits HANG_TIMEOUT seconds): no job step waited for the receiver.
    assert job.status == "succeeded"
    assert job.finished_at - running[0].at < HANG_TIMEOUT
    assert job.finished_at - job.started_at < HANG_TIMEOUT
    records = {d.event_type: d for d in delivered["alice"].webhooks.deliveries(hang.id).data}
    assert records["job.running"].status == "pending" and records["job.running"].id == running[0].webhook_id
    assert not any(a["status_code"] for a in records["job.running"].attempt_log)  # never answered
    # and the other endpoints were served meanwhile
    assert receiver.requests("/ok")[0].at < running[0].at + HANG_TIMEOUT


def test_another_tenants_webhooks_never_see_this_tenants_events(delivered):
    receiver, alice, bob, endpoints = delivered["receiver"], delivered["alice"], delivered["bob"], delivered["endpoints"]
    assert receiver.requests("/ok/tenant-b") == []
    assert bob.webhooks.deliveries(endpoints["spy"].id).data == []
    assert [w.id for w in bob.webhooks.list().data] == [endpoints["spy"].id]
    assert endpoints["spy"].id not in {w.id for w in alice.webhooks.list().data}
    never = "wh_" + "0" * 24
    for theirs in (endpoints["ok"].id, never):  # someone else's id answers exactly like one that never existed
        for call in (bob.webhooks.get, bob.webhooks.delete, bob.webhooks.deliveries):
            with pytest.raises(NotFoundError) as info:
                call(theirs)
            assert (info.value.code, info.value.param) == ("webhook_not_found", "webhook_id")
    assert alice.webhooks.get(endpoints["ok"].id).url.endswith("/ok")  # still there


# --- the API, and dispatchers in this process --------------------------------------------------


@pytest.fixture(scope="module")
def hooks_api(tmp_path_factory):
    """An API-only deployment (no worker: jobs stay queued, nothing sends unless a test starts a dispatcher)."""
    deployment, cleanup = _deployment("hooksapi", tmp_path_factory, {"outbound_allowed_networks": ["127.0.0.0/8"], "webhook_max_endpoints": 3})
    yield deployment
    _teardown(cleanup)


@pytest.fixture
def tenant(hooks_api):
    key = hooks_api.new_key(f"t-{secrets.token_hex(4)}")
    with hooks_api.client(key) as client:
        yield client


@pytest.fixture
def receiver():
    with WebhookReceiver() as running:
        yield running


def dispatcher_for(deployment, **settings):
    from worker.webhooks import Dispatcher

    values = {"webhook_poll_seconds": 0.05, "webhook_retry_base_seconds": 0.2, "webhook_timeout_seconds": 1.0, "webhook_retry_window_seconds": 3.0, **settings}
    policy = values.pop("policy", None)
    return Dispatcher(deployment.settings.model_copy(update=values), owner=f"test-{secrets.token_hex(3)}", policy=policy)


def test_registering_checks_the_url_and_shows_the_secret_once(hooks_api, tenant):
    with raw(hooks_api, tenant.connection.api_key) as http:
        for body, code, param, fragment in [
            ({"url": "ftp://example.com/x"}, "invalid_url", "url", "http:// or https://"),
            ({"url": "https://user:pw@example.com/x"}, "invalid_url", "url", "user name or password"),
            ({"url": "http://exa mple.com/"}, "invalid_url", "url", "space"),
            ({"url": "http://example.com:99999/"}, "invalid_url", "url", "not a valid URL"),
            ({"url": "http://169.254.169.254/latest"}, "url_not_allowed", "url", "link-local"),
            ({"url": "http://10.1.2.3/hook"}, "url_not_allowed", "url", "private"),
            ({"url": "http://no-such-host.invalid/hook"}, "url_unresolvable", "url", "does not resolve"),
            ({"url": "http://127.0.0.1:9/x", "events": ["job.done"]}, "invalid_request", "events[0]", "job.succeeded"),
            ({"url": "http://127.0.0.1:9/x", "events": []}, "invalid_request", "events", "at least 1"),
            ({"url": "http://127.0.0.1:9/x", "events": ["job.failed", "job.failed"]}, "invalid_request", "events", "more than once"),
            ({"url": "http://127.0.0.1:9/x", "secret": "mine"}, "invalid_request", "secret", "not a known field"),
        ]:
            error = error_of(http.post("/v1/webhooks", json=body), 422)
            assert (error["code"], error["param"]) == (code, param) and fragment in error["message"], (body, error)
            assert error["message"].startswith(param)
        assert http.get("/v1/webhooks").json()["data"] == []  # nothing was stored
    created = tenant.webhooks.create("http://127.0.0.1:9/hook", description="build bot")
    assert created.events == ["job.succeeded", "job.failed", "job.cancelled"]  # the default
    assert created.secret.startswith("whsec_") and len(created.secret) > 40
    assert tenant.webhooks.get(created.id).secret is None and tenant.webhooks.list().data[0].secret is None
    for _ in range(2):
        tenant.webhooks.create("http://127.0.0.1:9/more")
    with raw(hooks_api, tenant.connection.api_key) as http:
        assert error_of(http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x"}), 409)["code"] == "webhook_limit_reached"
    assert tenant.webhooks.delete(created.id)["deleted"] is True
    with pytest.raises(NotFoundError):
        tenant.webhooks.get(created.id)


def test_the_default_policy_refuses_loopback(api_deployment, tenant_key):
    with raw(api_deployment, tenant_key) as http:
        error = error_of(http.post("/v1/webhooks", json={"url": "http://127.0.0.1:8080/hook"}), 422)
    assert (error["code"], error["param"]) == ("url_not_allowed", "url") and "loopback" in error["message"]
    assert "QDPO_OUTBOUND_ALLOWED_NETWORKS" in error["message"]


def test_errors_and_timeouts_are_retried_with_back_off_then_given_up(hooks_api, tenant, receiver):
    failing = tenant.webhooks.create(receiver.url("/fail"), events=["job.queued"])
    silent = tenant.webhooks.create(receiver.url("/hang"), events=["job.queued"])
    tenant.webhooks.create(receiver.url("/ok"), events=["job.queued"])
    job = tenant.jobs.create(seed=1)
    dispatcher = dispatcher_for(hooks_api).start()
    try:
        # a receiver that never answers holds up nobody else: the good one is served at once
        wait_for(lambda: receiver.requests("/ok"), 3, 0.05, what="the ok endpoint's delivery")
        wait_for(lambda: all(tenant.webhooks.deliveries(e.id).data[0].status == "failed" for e in (failing, silent)), 20, 0.2, what="both to be given up")
    finally:
        dispatcher.stop(grace=0)
    broken, hung = tenant.webhooks.deliveries(failing.id).data[0], tenant.webhooks.deliveries(silent.id).data[0]
    assert broken.job_id == job.id and broken.attempts >= 3 and {a["status_code"] for a in broken.attempt_log} == {500}
    gaps = [b["at"] - a["at"] for a, b in zip(broken.attempt_log, broken.attempt_log[1:])]
    assert all(gap >= 0.2 * 2**n - 0.01 for n, gap in enumerate(gaps)), gaps  # never sooner than 0.2 s, 0.4 s, 0.8 s, … apart
    assert broken.attempt_log[-1]["at"] - broken.created_at <= 3.0 + 1  # within the retry window
    assert hung.attempts >= 2 and all(a["error"].startswith("timeout") for a in hung.attempt_log)
    assert len({r.webhook_id for r in receiver.requests("/hang")}) == 1 and len(receiver.requests("/hang")) == hung.attempts
    assert len(receiver.requests("/fail")) == broken.attempts  # given up: nothing more is sent
    assert [d.status for d in tenant.webhooks.deliveries(failing.id, status="failed").data] == ["failed"]
    assert tenant.webhooks.deliveries(failing.id, status="pending").data == []


def test_the_dispatcher_checks_the_address_it_connects_to(hooks_api, tenant, receiver):
    """An endpoint accepted when it resolved to an allowed address is still refused when the dispatcher's policy forbids where it leads now."""
    from qdpo_core.outbound import OutboundPolicy

    endpoint = tenant.webhooks.create(receiver.url("/ok"), events=["job.queued"])
    tenant.jobs.create(seed=2)
    dispatcher = dispatcher_for(hooks_api, policy=OutboundPolicy(allow_private=False)).start()
    try:
        wait_for(lambda: tenant.webhooks.deliveries(endpoint.id).data[0].attempts >= 1, 10, 0.1, what="an attempt")
    finally:
        dispatcher.stop(grace=0)
    record = tenant.webhooks.deliveries(endpoint.id).data[0]
    assert record.last_error.startswith("url_not_allowed: 127.0.0.1 is a loopback address"), record.last_error
    assert receiver.requests() == []  # refused before connecting


def test_two_dispatchers_send_each_delivery_once(hooks_api, tenant, receiver):
    tenant.webhooks.create(receiver.url("/ok"), events=["job.queued", "job.cancelled"])
    for n in range(6):
        tenant.jobs.cancel(tenant.jobs.create(seed=10 + n).id)  # queued, then cancelled: 12 deliveries
    first, second = dispatcher_for(hooks_api).start(), dispatcher_for(hooks_api).start()
    try:
        wait_for(lambda: len(receiver.requests("/ok")) >= 12, 15, 0.1, what="12 deliveries")
        time.sleep(1)
    finally:
        first.stop()
        second.stop()
    ids = [r.webhook_id for r in receiver.requests("/ok")]
    assert len(ids) == len(set(ids)) == 12


def test_a_dispatcher_that_dies_mid_send_is_covered_by_another(hooks_api, tenant, receiver):
    """At-least-once: a claim whose dispatcher never reports back lapses, and the delivery goes out with the same webhook-id."""
    from service.crud import webhooks as webhooks_crud
    from service.tables import utcnow

    endpoint = tenant.webhooks.create(receiver.url("/ok"), events=["job.queued"])
    tenant.jobs.create(seed=3)
    with hooks_api.sessions() as session:
        ((delivery, _),) = [(d, e) for d, e in webhooks_crud.due_deliveries(session, now=utcnow(), limit=100) if e.id == endpoint.id]
        assert webhooks_crud.claim(session, delivery=delivery, owner="a-dispatcher-that-dies", now=utcnow(), lease_seconds=1.5) == 1
    dispatcher = dispatcher_for(hooks_api).start()
    try:
        time.sleep(0.8)
        assert receiver.requests() == []  # still claimed by the dead one
        wait_for(lambda: receiver.requests("/ok"), 5, 0.05, what="the delivery after the claim lapsed")
        wait_for(lambda: tenant.webhooks.deliveries(endpoint.id).data[0].status == "succeeded", 5, 0.1, what="it to be recorded")
    finally:
        dispatcher.stop()
    record = tenant.webhooks.deliveries(endpoint.id).data[0]
    assert receiver.requests("/ok")[0].webhook_id == record.id == delivery.id
    assert record.attempts == 2 and [a["attempt"] for a in record.attempt_log] == [2]  # attempt 1 never reported


def test_sign_and_verify_are_the_standard_webhooks_scheme():
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body, msg_id, timestamp = b'{"type":"job.succeeded"}', "msg_p5jXN8AQM9LWM0D4loKWxJek", int(time.time())
    signature = sign_webhook(body, msg_id=msg_id, timestamp=timestamp, secret=secret)
    assert signature == standardwebhooks.Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=timezone.utc), body.decode())
    headers = {"Webhook-Id": msg_id, "Webhook-Timestamp": str(timestamp), "Webhook-Signature": f"v1,bm9wZQ== {signature}"}  # any one may match
    assert verify_webhook(body, headers, secret) == {"type": "job.succeeded"}
    with pytest.raises(WebhookVerificationError, match="missing header"):
        verify_webhook(body, {"webhook-id": msg_id}, secret)
    with pytest.raises(WebhookVerificationError, match="whsec_"):
        verify_webhook(body, headers, "not base64!")


def test_the_clients_and_the_command_line_manage_webhooks(hooks_api, tenant, receiver):
    import asyncio

    from .test_cli import qdpo

    async def scenario():
        async with AsyncClient(hooks_api.base_url, api_key=tenant.connection.api_key, max_retries=1) as client:
            created = await client.webhooks.create(receiver.url("/ok"), events=["job.queued"])
            assert created.secret and [w.id for w in (await client.webhooks.list()).data] == [created.id]
            assert (await client.webhooks.get(created.id)).events == ["job.queued"]
            assert (await client.webhooks.deliveries(created.id)).data == []
            await client.webhooks.delete(created.id)
            with pytest.raises(NotFoundError):
                await client.webhooks.get(created.id)

    asyncio.run(scenario())
    key = tenant.connection.api_key
    made = qdpo(hooks_api, "webhooks", "create", receiver.url("/ok"), "--event", "job.queued", "--event", "job.cancelled", key=key)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip().splitlines()[-1]
    webhook_id = made.stdout.split()[1]
    assert secret.startswith("whsec_") and webhook_id.startswith("wh_")
    listed = qdpo(hooks_api, "webhooks", "list", key=key)
    assert webhook_id in listed.stdout and "job.cancelled" in listed.stdout and secret not in listed.stdout
    job = tenant.jobs.create(seed=4)
    tenant.jobs.cancel(job.id)
    deliveries = qdpo(hooks_api, "webhooks", "deliveries", webhook_id, key=key)
    assert deliveries.returncode == 0 and deliveries.stdout.count(job.id) == 2 and "pending" in deliveries.stdout
    refused = qdpo(hooks_api, "webhooks", "create", "http://10.0.0.1/x", key=key)
    assert refused.returncode == 1 and "url_not_allowed" in refused.stderr and "(field: url)" in refused.stderr
    assert qdpo(hooks_api, "webhooks", "delete", webhook_id, key=key).returncode == 0
