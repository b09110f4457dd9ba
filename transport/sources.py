"""Per-source limits, as SIP edges have them (Kamailio's and OpenSIPS's ``pike`` and ``ratelimit``).

One peer address (for IPv6, its ``source_ipv6_prefix``: a /64 by default) may hold at most
``max_connections_per_ip`` connections, open at most ``new_connections_per_ip``
per second (a burst of twice that), and send
at most ``requests_per_ip`` messages per second (same burst). Over a connection
limit the new connection is closed at accept; over the request rate the
transport answers ``503`` with ``Retry-After`` itself, before any worker sees the
message. A worker that sees a peer fail an authentication says so (an
AUTH_FAILED record): ``auth_failures_per_ip`` failures within
``auth_failure_window`` seconds block the address for that long, like
``pike`` after a password scan: the connection of the failure that crossed the
limit, and of any later one, is closed once its answer is out, and new
connections are closed at accept. Addresses in ``source_limits_allow``
(loopback by default: local tools and benchmarks) are never limited.

Cost and locking: the connection count, the connect-rate buckets and the
failure counts change once per connection or failure, under one lock. The request bucket is one object per address,
attached to each of its connections at accept, so the per-message path does no
lookup and takes no lock; two I/O threads serving the same address may race on
it, which can only let a few more messages through, never fewer.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from sipwire.config import Settings

#: A token bucket holds this many seconds' worth of its rate: short bursts pass, floods do not.
BURST_SECONDS: Final = 2.0
#: Addresses that hold no connection are forgotten past this many, least recent first (their connect rate,
#: failures and block go with them: an attacker with that many addresses is beyond a per-address limit anyway).
MAX_IDLE_SOURCES: Final = 65536

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TokenBucket:
    """``rate`` tokens per second, at most ``rate * BURST_SECONDS`` saved up."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = rate * BURST_SECONDS
        self.tokens = self.capacity
        self.stamp = now

    def take(self, count: int, now: float) -> int:
        """Take up to ``count`` tokens; how many were there."""
        if now > self.stamp:  # callers' clocks are read at different moments: never refill backwards
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        granted = min(count, int(self.tokens))
        self.tokens -= granted
        return granted


@dataclass(slots=True)
class Source:
    """What the limits keep of one peer address (while it has connections, then among the idle ones)."""

    address: str
    connections: int
    connect_bucket: TokenBucket
    requests: TokenBucket
    auth_failures: int = 0  # within the window that started at auth_window_start
    auth_window_start: float = 0.0
    blocked_until: float = 0.0


class SourceLimits:
    """The limits of every peer address; shared by the I/O threads (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.max_connections = settings.max_connections_per_ip
        self.connect_rate = float(settings.new_connections_per_ip)
        self.request_rate = float(settings.requests_per_ip)
        self.auth_failures = settings.auth_failures_per_ip
        self.auth_window = settings.auth_failure_window
        self.allowed: tuple[Network, ...] = parse_networks(settings.source_limits_allow)
        self.ipv6_prefix = settings.source_ipv6_prefix
        self._lock = threading.Lock()
        self._active: dict[str, Source] = {}
        self._idle: OrderedDict[str, Source] = OrderedDict()  # sources with no connection

    def exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.allowed)

    def admit(self, address: str) -> Source | str | None:
        """At accept: the address's :class:`Source`, None when it is exempt, or why it is refused."""
        address = unmapped(address)
        if self.exempt(address):
            return None
        if ":" in address:  # an IPv6 host changes its address within its prefix at will: the prefix is the source
            address = str(ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False))
        now = time.monotonic()
        with self._lock:
            source = self._active.get(address) or self._idle.pop(address, None)
            if source is None:
                source = Source(address, 0, TokenBucket(self.connect_rate, now), TokenBucket(self.request_rate, now))
            refusal = ""
            if source.blocked_until > now:
                refusal = "auth_failures"
            elif source.connections >= self.max_connections:
                refusal = "connections_per_ip"
            elif not source.connect_bucket.take(1, now):
                refusal = "connection_rate"
            if refusal:
                if not source.connections:
                    self._remember_idle(source)
                return refusal
            self._active[address] = source
            source.connections += 1
            return source

    def release(self, source: Source) -> None:
        """A connection of ``source`` closed."""
        with self._lock:
            source.connections -= 1
            if source.connections <= 0 and self._active.get(source.address) is source:
                del self._active[source.address]
                self._remember_idle(source)

    def auth_failed(self, source: Source) -> bool:
        """Charge one failed authentication to ``source``; True when the address is (now) blocked."""
        now = time.monotonic()
        with self._lock:
            if source.blocked_until > now:
                return True
            if now - source.auth_window_start > self.auth_window:
                source.auth_failures = 0
                source.auth_window_start = now
            source.auth_failures += 1
            if source.auth_failures < self.auth_failures:
                return False
            source.auth_failures = 0
            source.blocked_until = now + self.auth_window
            return True

    def _remember_idle(self, source: Source) -> None:
        self._idle[source.address] = source
        self._idle.move_to_end(source.address)
        while len(self._idle) > MAX_IDLE_SOURCES:
            self._idle.popitem(last=False)

    def sources(self) -> int:
        """Addresses with open connections (for the stats)."""
        return len(self._active)


def unmapped(address: str) -> str:
    """An IPv4 peer of a dual-stack listener (``::ffff:192.0.2.1``) as the IPv4 address it is.

    Else no IPv4 network of ``source_limits_allow`` would contain it, and it would be limited apart from the
    same peer reaching an IPv4 listener.
    """
    if not address.startswith("::ffff:"):
        return address
    try:
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
    except ValueError:
        return address
    return address if mapped is None else str(mapped)


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"127.0.0.0/8, ::1"`` -> networks; raises ValueError naming a bad entry."""
    networks = []
    for item in text.split(","):
        if item.strip():
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
    return tuple(networks)
