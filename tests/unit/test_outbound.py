"""The outbound policy: which addresses a worker may call, checked on the address it connects to.

Runs real HTTP servers on 127.0.0.1 (tests/chat_server.py): loopback is refused by a restrictive
policy and allowed here explicitly, the way an operator allows an internal endpoint.
"""

from __future__ import annotations

import socket

import httpx
import pytest
from chat_server import create_app, serve

from qdpo_core import outbound
from qdpo_core.config import LabelerSpec
from qdpo_core.labelers.openai_api import OpenAILabeler
from qdpo_core.outbound import OutboundPolicy, OutboundRefused, OutboundUnresolvable

RESTRICTED = OutboundPolicy(allow_private=False)
LOOPBACK_ALLOWED = OutboundPolicy(allow_private=False, allowed_networks=("127.0.0.0/8", "::1/128"))


@pytest.fixture
def policy():
    """Restore the process-wide policy after a test that sets one."""
    before = outbound.current_policy()
    yield outbound.set_policy
    outbound.set_policy(before)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.5.4", "private"),
        ("fd00::1", "private"),
        ("100.64.0.1", "not globally routable"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:a00:1::", "private"),  # 6to4 around 10.0.0.1
        ("64:ff9b::a9fe:a9fe", ""),  # NAT64 around 169.254.169.254
    ],
)
def test_non_global_addresses_are_refused(address, reason):
    refusal = RESTRICTED.refusal(address)
    assert refusal is not None and reason in refusal


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_global_addresses_are_allowed(address):
    assert RESTRICTED.refusal(address) is None


def test_allowed_networks_and_the_library_default():
    assert LOOPBACK_ALLOWED.refusal("127.0.0.1") is None and LOOPBACK_ALLOWED.refusal("::ffff:127.0.0.1") is None
    assert LOOPBACK_ALLOWED.refusal("10.0.0.1") is not None
    assert OutboundPolicy().refusal("169.254.169.254") is None and not OutboundPolicy().restricts  # `qdpo run` keeps today's behaviour


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest", "http://localhost:8000/v1", "http://2130706433/v1", "http://0x7f.1/v1", "http://[::1]:80/v1", "https://127.1/v1"],
)
def test_check_url_resolves_the_host_and_names_the_field(url):
    with pytest.raises(OutboundRefused) as info:
        RESTRICTED.check_url(url, "eval.judge.base_url")
    assert info.value.param == "eval.judge.base_url" and info.value.message.startswith("eval.judge.base_url: ")
    assert info.value.code == "url_not_allowed"


def test_a_host_that_does_not_resolve_is_named():
    with pytest.raises(OutboundUnresolvable) as info:
        RESTRICTED.check_url("http://no-such-host.invalid/v1", "method.rlaif.labeler.base_url")
    assert info.value.param == "method.rlaif.labeler.base_url" and "does not resolve" in info.value.message


def _labeler(base_url):
    return OpenAILabeler(LabelerSpec(kind="openai", base_url=base_url, model="m", max_retries=2), "rlaif.labeler")


def test_the_labeler_refuses_to_connect_to_a_refused_address_and_does_not_retry(policy):
    app = create_app(mode="rule")
    with serve(app) as base_url:
        policy(RESTRICTED)
        labeler = _labeler(base_url.replace("127.0.0.1", "localhost"))
        with pytest.raises(OutboundRefused) as info:
            labeler.reply([[{"role": "user", "content": "hi"}]], max_tokens=4)
    assert info.value.param == "rlaif.labeler.base_url" and "loopback" in info.value.message and "'localhost'" in info.value.message
    assert app.state.requests == []  # no request ever reached the server


def test_loopback_allowed_explicitly_works(policy):
    app = create_app(mode="rule")
    with serve(app) as base_url:
        policy(LOOPBACK_ALLOWED)
        assert _labeler(base_url).reply([[{"role": "user", "content": "hi"}]], max_tokens=4) == ["Yes"]
    assert len(app.state.requests) == 1


def test_the_transport_checks_the_address_it_connects_to_not_an_earlier_answer(monkeypatch):
    # DNS rebinding: the name resolved to a public address when the job was accepted, and to
    # loopback when the worker connects. The connection must be refused, not made.
    app = create_app(mode="rule")
    with serve(app) as base_url:
        port = httpx.URL(base_url).port
        real = socket.getaddrinfo
        answers = iter(["93.184.216.34", "127.0.0.1"])

        def rebinding(host, *args, **kwargs):
            if host == "judge.example":
                return real(next(answers), *args, **kwargs)
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        url = f"http://judge.example:{port}/v1"
        RESTRICTED.check_url(url, "eval.judge.base_url")  # at creation: public, accepted
        with httpx.Client(transport=outbound.GuardedTransport(RESTRICTED)) as client:
            with pytest.raises(httpx.ConnectError) as info:
                client.post(url + "/chat/completions", json={})
        assert isinstance(outbound.blocked_cause(info.value), outbound.OutboundBlocked)
    assert app.state.requests == []


def test_a_mixed_answer_is_refused_whole(monkeypatch):
    real = socket.getaddrinfo

    def mixed(host, port, *args, **kwargs):
        if host == "mixed.example":
            return real("8.8.8.8", port, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", mixed)
    with pytest.raises(OutboundRefused):
        RESTRICTED.check_url("http://mixed.example/v1", "eval.judge.base_url")
    with httpx.Client(transport=outbound.GuardedTransport(RESTRICTED)) as client:
        with pytest.raises(httpx.ConnectError):
            client.get("http://mixed.example/")
