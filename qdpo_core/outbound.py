"""Which addresses this process may call out to (labelers, judges; later webhooks), and an httpx
transport that enforces it on the address it actually connects to.

    from qdpo_core import outbound
    outbound.set_policy(outbound.OutboundPolicy(allow_private=False, allowed_networks=("10.0.0.5/32",)))
    outbound.current_policy().check_url("http://169.254.169.254/latest", "eval.judge.base_url")   # raises OutboundRefused

A service must not let its users point a worker at the cloud's metadata endpoint, its own
database or anything else on the private network (server-side request forgery). A restrictive
policy refuses every address that is not globally routable by the `ipaddress` module's account —
loopback, link-local, private, shared (CGNAT), reserved, multicast, unspecified, and IPv4 hidden
in IPv6 (mapped, NAT64, 6to4) — unless it lies in an allowed network.

The URL is checked where it is accepted (the API resolves the host when a job is created) and
again on every connection (DNS can change in between, or answer differently each time): the
transport resolves the host itself, refuses the connection if any address is disallowed, and
connects to the checked address, so the check and the connection cannot disagree. TLS still
verifies and sends the host name (SNI), since only the TCP connection is made to the IP.

The library's default policy allows everything: `qdpo run` on a laptop calls a judge on
localhost exactly as before. The worker sets the deployment's policy from its settings
(QDPO_OUTBOUND_ALLOW_PRIVATE, QDPO_OUTBOUND_ALLOWED_NETWORKS) before each job.
"""

from __future__ import annotations

import ipaddress
import socket
import typing
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpcore
import httpx

from qdpo_core.errors import QdpoError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class OutboundRefused(QdpoError):
    """A URL's host is, or resolves to, an address this deployment does not call."""

    code = "url_not_allowed"


class OutboundUnresolvable(QdpoError):
    """A URL's host does not resolve (checked where the URL is accepted)."""

    code = "url_unresolvable"


class OutboundBlocked(httpcore.ConnectError):
    """Raised by the guarded transport instead of connecting; httpx reports it as a ConnectError caused by this."""

    def __init__(self, host: str, reason: str):
        super().__init__(f"{host}: {reason}")
        self.host, self.reason = host, reason


def _embedded(ip: Address) -> list[Address]:
    """The address itself and any IPv4 address it carries (mapped, NAT64, 6to4)."""
    found = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip in _NAT64:
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.teredo is not None:
            found.extend(ip.teredo)
    return found


def _not_global_because(ip: Address) -> str | None:
    for address in reversed(_embedded(ip)):  # an embedded IPv4 address says most about where a packet goes
        for reason, flag in (
            ("loopback", address.is_loopback),
            ("link-local", address.is_link_local),
            ("unspecified", address.is_unspecified),
            ("multicast", address.is_multicast),
            ("private", address.is_private),
            ("reserved", address.is_reserved),
            ("not globally routable", not address.is_global),
        ):
            if flag:
                return f"{reason} address {address}" if address == ip else f"{reason} address {address} inside {ip}"
    return None


@dataclass(frozen=True)
class OutboundPolicy:
    """`allow_private=True` (the library default) allows every address; otherwise only global ones and `allowed_networks`."""

    allow_private: bool = True
    allowed_networks: tuple[str, ...] = ()
    how_to_allow: str = "allow it with qdpo_core.outbound.set_policy(OutboundPolicy(allowed_networks=(...)))"
    _networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_networks", tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks))

    @property
    def restricts(self) -> bool:
        return not self.allow_private

    def refusal(self, address: str | Address) -> str | None:
        """Why the address may not be called, or None when it may."""
        if self.allow_private:
            return None
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if any(candidate in network for candidate in _embedded(ip) for network in self._networks if candidate.version == network.version):
            return None
        return _not_global_because(ip)

    def check_url(self, url: str, param: str) -> None:
        """Resolve the URL's host and refuse it if any address is disallowed; errors name `param`."""
        if not self.restricts:
            return
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = resolve(host, port)
        except OSError as exc:
            raise OutboundUnresolvable(f"{param}: the host {host!r} does not resolve ({exc.strerror or exc}); check the URL", param=param) from None
        for address in addresses:
            reason = self.refusal(address)
            if reason is not None:
                raise OutboundRefused(refused_message(param, host, reason, self), param=param)


def refused_message(param: str, host: str, reason: str, policy: OutboundPolicy) -> str:
    try:
        ipaddress.ip_address(host)
        where = f"{host} is a {reason.removesuffix(' ' + host)}"
    except ValueError:
        where = f"{host!r} resolves to a {reason}"
    return f"{param}: {where}, which this deployment does not call; use a public endpoint, or {policy.how_to_allow}"


def resolve(host: str, port: int) -> list[str]:
    """Every address the host resolves to, IP literals included (each once, in resolver order)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))


_policy = OutboundPolicy()


def current_policy() -> OutboundPolicy:
    return _policy


def set_policy(policy: OutboundPolicy) -> None:
    """The policy every outbound client created afterwards in this process uses."""
    global _policy
    _policy = policy


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's own backend, but a TCP connection goes only to an address the policy allows."""

    def __init__(self, policy: OutboundPolicy, backend: httpcore.NetworkBackend | None = None):
        self.policy = policy
        self.backend = backend or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"{host}: {exc}") from exc
        for address in addresses:  # every answer is checked: a mixed answer is refused whole
            reason = self.policy.refusal(address)
            if reason is not None:
                raise OutboundBlocked(host, reason)
        error: Exception | None = None
        for address in addresses:
            try:
                return self.backend.connect_tcp(address, port, timeout=timeout, local_address=local_address, socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error or httpcore.ConnectError(f"{host}: no address")

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None) -> httpcore.NetworkStream:
        raise OutboundBlocked(path, "Unix socket")

    def sleep(self, seconds: float) -> None:
        self.backend.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport whose every connection goes through `GuardedBackend` (no proxies: the check must see the real peer)."""

    def __init__(self, policy: OutboundPolicy, verify: bool = True, limits: httpx.Limits = httpx.Limits()):
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )


def blocked_cause(exc: BaseException) -> OutboundBlocked | None:
    """The OutboundBlocked behind an httpx error, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OutboundBlocked):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
