"""The router API: what an operator-written router receives and can do.

A router is a plain function ``route(message, ctx) -> None`` named on the
command line as ``--router package.module:function``. The worker calls it
once per received message, in arrival order per connection:

* ``message`` is the parsed :class:`transport.sip.SipMessage`;
* ``ctx`` is a :class:`RouteContext`: the message's :class:`Envelope`
  (connection id, addresses, receive time) and the two ways to send:
  :meth:`RouteContext.reply` on the same connection, and
  :meth:`RouteContext.send` to a :class:`Destination` (the transport reuses
  an open connection to it or opens one).

Both return a job id at once; the transport later reports the job's
:class:`Outcome` (sent, refused, timeout, queue full...). Pass
``on_outcome`` to act on it, e.g. to answer 503 when a forward fails.
Outcome callbacks run in the same worker, between messages.

A router module may also define ``setup(settings)``, called once per
worker before the first message (read your own settings there);
``preflight(settings)``, called once by the transport before it starts
(raise a :class:`~sipwire.errors.ConfigurationError` to refuse to start);
and ``connections_closed(conn_ids, count)``, called in every worker with
the ids of connections that closed after carrying messages (a registrar
drops the bindings that lived on them; ``count(name)`` adds to a counter). ``ctx.count(name)`` adds one to a transport
counter (``ctl stats``); names must come from a fixed set, never from peer text. ``ctx.auth_failed()``
reports a failed authentication by the message's peer, which the per-source limits count.
"""

from __future__ import annotations

import importlib
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from sipwire.errors import ConfigurationError
from sipwire.transport.outcome import WriteResult
from sipwire.transport.tlsinfo import TlsInfo

if TYPE_CHECKING:
    from sipwire.config import Settings
    from sipwire.transport.sip import SipMessage


class Envelope(NamedTuple):
    """Where and when a message arrived; ``tls`` is set on TLS connections."""

    conn_id: int
    transport: str
    local: tuple[str, int]
    remote: tuple[str, int]
    received_at: float
    trace_context: str
    tls: TlsInfo | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """Where to send: the transport reuses an open connection to it or opens one.

    ``host`` may be a name; the worker resolves it before submitting the
    job (the transport never blocks on DNS). For ``tls``, ``server_name``
    is sent as SNI and checked against the peer's certificate; it defaults
    to ``host`` when that is a name.
    """

    transport: str
    host: str
    port: int
    server_name: str = ""

    def tls_name(self, address: str) -> str:
        """The TLS name to send and check once ``host`` resolved to ``address``: ``server_name``, else
        the host when it was a name; ASCII (IDNA). Raises ValueError for a name that cannot be one."""
        name = self.server_name or (self.host if address != self.host.strip("[]") else "")
        if not name:
            return ""
        try:
            encoded = name.encode("idna").decode("ascii")
        except UnicodeError as error:
            raise ValueError(f"server name {name!r} is not a valid host name: {error}") from error
        if len(encoded) > 253:
            raise ValueError(f"server name {name[:40]!r}... is longer than 253 characters")
        return encoded


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (without brackets), so needs no DNS.

    ``inet_pton`` answers the usual cases in C; ``ipaddress`` (pure Python, several times slower) only
    what it alone reads, an IPv6 address with a zone (``fe80::1%eth0``).
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):  # ValueError: an embedded NUL
            continue
        return True
    if "%" not in host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Outcome(NamedTuple):
    """The transport's report on one write job."""

    job_id: int
    conn_id: int
    result: WriteResult
    reason: str

    @property
    def ok(self) -> bool:
        return self.result is WriteResult.SENT


OutcomeCallback = Callable[[Outcome], None]


class Sender(Protocol):
    """The worker side of write jobs (implemented by the worker process)."""

    def submit(
        self,
        conn_id: int,
        destination: Destination | None,
        data: bytes,
        on_outcome: OutcomeCallback | None,
        failures_only: bool = False,
    ) -> int: ...

    def count(self, name: str) -> None: ...

    def auth_failed(self, conn_id: int) -> None: ...


class RouteContext:
    """Per-message handle given to a router."""

    __slots__ = ("_sender", "envelope")

    def __init__(self, envelope: Envelope, sender: Sender) -> None:
        self.envelope = envelope
        self._sender = sender

    def reply(self, data: bytes, on_outcome: OutcomeCallback | None = None, *, failures_only: bool = False) -> int:
        """Send ``data`` on the connection the message came in on; return the job id.

        ``on_outcome`` gets the job's outcome. With ``failures_only`` a success reaches it late (with
        later records, within a tick), which spares the worker a wake-up per job: for callbacks that
        act on failures only, like a proxy's 503.
        """
        return self._sender.submit(self.envelope.conn_id, None, data, on_outcome, failures_only)

    def send(
        self, destination: Destination, data: bytes, on_outcome: OutcomeCallback | None = None, *,
        failures_only: bool = False,
    ) -> int:  # fmt: skip
        """Send ``data`` to ``destination``; return the job id. ``failures_only``: see :meth:`reply`."""
        return self._sender.submit(0, destination, data, on_outcome, failures_only)

    def send_on(
        self, conn_id: int, data: bytes, on_outcome: OutcomeCallback | None = None, *, failures_only: bool = False
    ) -> int:
        """Send ``data`` on another open connection, named by its id. ``failures_only``: see :meth:`reply`."""
        return self._sender.submit(conn_id, None, data, on_outcome, failures_only)

    def count(self, name: str) -> None:
        """Add one to the transport counter ``name`` (a fixed name, ASCII, at most 56 bytes)."""
        self._sender.count(name)

    def auth_failed(self) -> None:
        """The peer of this message failed an authentication: the transport charges its address
        (``auth_failures_per_ip``; see ``transport/sources.py``)."""
        self._sender.auth_failed(self.envelope.conn_id)


Router = Callable[["SipMessage", RouteContext], None]

BUILTIN_ROUTERS = {
    "responder": "sipwire.transport.routers.responder:route",
    "proxy": "sipwire.transport.routers.proxy:route",
}


class RouterLoadError(ConfigurationError):
    """The configured router cannot be imported or is not callable."""


class LoadedRouter(NamedTuple):
    """A router function and its module's optional hooks (see the module docstring)."""

    route: Router
    setup: Callable[[Settings], None] | None
    preflight: Callable[[Settings], None] | None
    connections_closed: Callable[[list[int], Callable[[str], None]], None] | None


def load_router(spec: str) -> LoadedRouter:
    """Resolve ``responder``, ``proxy`` or ``module:function`` and its module's hooks."""
    target = BUILTIN_ROUTERS.get(spec, spec)
    module_name, sep, function_name = target.partition(":")
    if not sep or not module_name or not function_name:
        raise RouterLoadError(
            f"router {spec!r} is neither a built-in ({', '.join(BUILTIN_ROUTERS)}) nor module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RouterLoadError(f"router {spec!r}: cannot import module {module_name!r}: {error}") from error
    route = getattr(module, function_name, None)
    if not callable(route):
        raise RouterLoadError(f"router {spec!r}: module {module_name!r} has no callable {function_name!r}")
    hooks = [getattr(module, name, None) for name in ("setup", "preflight", "connections_closed")]
    setup, preflight, closed = (hook if callable(hook) else None for hook in hooks)
    return LoadedRouter(route, setup, preflight, closed)
