"""One TCP, TLS, WS or WSS connection as the transport sees it, and its state machine.

A connection is owned by exactly one I/O thread at a time: only that thread
calls its methods. Moving it to another thread (resize) hands over the
whole object, buffers and pending write jobs included.

States and the only transitions allowed (see :data:`TRANSITIONS`)::

    CONNECTING --connected--> [HANDSHAKE --TLS and/or WebSocket upgrade done-->] OPEN
        --flush then close--> CLOSING --> CLOSED
      CONNECTING and HANDSHAKE may also go straight to CLOSED (refused, timeout, TLS failure);
      HANDSHAKE goes to CLOSING when a refused WebSocket upgrade is answered before the close.

An accepted TCP connection starts OPEN; TLS, WS and WSS ones in HANDSHAKE (a WSS one stays there
after its TLS handshake until its WebSocket upgrade: :attr:`Connection.upgrading`).
"""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass, fields
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

from sipwire.errors import ConnectionIOError
from sipwire.transport.framing import Framer, FramerLimits
from sipwire.transport.streams import Stream
from sipwire.transport.tlsinfo import TlsInfo
from sipwire.transport.wire import message_prefix
from sipwire.transport.wsframing import WsFramer

if TYPE_CHECKING:
    from sipwire.otel.recorder import ConnTrace, WriteTrace
    from sipwire.transport.sources import Source


class ConnState(Enum):
    CONNECTING = "connecting"
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


TRANSITIONS: Final[dict[ConnState, frozenset[ConnState]]] = {
    ConnState.CONNECTING: frozenset({ConnState.HANDSHAKE, ConnState.OPEN, ConnState.CLOSED}),
    ConnState.HANDSHAKE: frozenset({ConnState.OPEN, ConnState.CLOSING, ConnState.CLOSED}),
    ConnState.OPEN: frozenset({ConnState.CLOSING, ConnState.CLOSED}),
    ConnState.CLOSING: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset(),
}


class StateError(ConnectionIOError):
    """A connection was asked to make a transition the state machine forbids."""


@dataclass(slots=True)
class PendingJob:
    """A write job whose bytes are queued: it is sent once ``end`` bytes are out."""

    job_id: int
    worker: int
    end: int
    prompt: bool  # the worker waits for this outcome: report it at once
    trace: WriteTrace | None = None  # the job's sip.write span, when its message is traced
    queued_at: float = 0.0  # monotonic time the owning thread queued it (write-job latency histogram)


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A snapshot of one connection: the one definition of what the control socket, ``ctl``,
    the REST API (its OpenAPI schema included) and the pages show of a connection."""

    id: int
    state: str
    transport: str
    local: str
    remote: str
    thread: int
    outbound: bool
    age: float
    idle: float
    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int
    pending_write_bytes: int
    in_flight: int
    tls_version: str
    tls_cipher: str
    tls_handshake_ms: float
    tls_server_name: str
    tls_peer_subject: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of this snapshot (field names as keys)."""
        return {name: getattr(self, name) for name in CONNECTION_INFO_FIELDS}


CONNECTION_INFO_FIELDS: Final = tuple(field.name for field in fields(ConnectionInfo))


class Connection:
    """Socket, framer, write queue and counters of one connection; ``ws`` is its WebSocket layer (WS, WSS)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "created",
        "deadline",
        "destination",
        "framer",
        "held",
        "id",
        "in_flight",
        "jobs",
        "last_activity",
        "local",
        "message_started",
        "messages_in",
        "messages_out",
        "out_chunks",
        "outbound",
        "prefix",
        "queued_total",
        "registered_events",
        "remote",
        "sent_total",
        "sock",
        "source",
        "state",
        "stats_mark",
        "stats_slot",
        "stream",
        "tls",
        "trace",
        "transport",
        "worker",
        "write_progress",
        "ws",
    )  # fmt: skip

    def __init__(
        self,
        conn_id: int,
        sock: socket.socket,
        stream: Stream,
        transport: str,
        local: tuple[str, int],
        remote: tuple[str, int],
        limits: FramerLimits,
        now: float,
        *,
        outbound: bool = False,
        destination: tuple[str, str, int] | None = None,
        ws: WsFramer | None = None,
    ) -> None:
        self.id = conn_id
        self.sock = sock
        self.stream = stream
        self.tls: TlsInfo | None = None
        if outbound:
            self.state = ConnState.CONNECTING
        else:
            self.state = ConnState.OPEN if transport == "tcp" else ConnState.HANDSHAKE
        self.transport = transport
        self.local = local
        self.remote = remote
        self.outbound = outbound
        self.destination = destination
        # WS and WSS: the WebSocket layer frames messages in place of the SIP stream framer, and wraps
        # what is sent (WriteLayer._enqueue); None on TCP and TLS, which pay one test per write for it.
        self.ws = ws
        self.framer: Framer | WsFramer = ws if ws is not None else Framer(limits)
        self.prefix = message_prefix(conn_id, transport, local, remote)
        self.created = now
        self.last_activity = now
        self.message_started = 0.0  # monotonic time the message in progress began; 0: none
        # CONNECTING/HANDSHAKE: when to give up; CLOSING: when to stop waiting for answers.
        self.deadline = 0.0
        self.out_chunks: deque[bytes | memoryview] = deque()
        # Framed messages past max_in_flight_per_connection, oldest first: (MESSAGE record, raw message).
        # While any wait here the connection is not read, so this holds at most one read's worth.
        self.held: deque[tuple[bytes, bytes]] = deque()
        self.source: Source | None = None  # the peer address's limits (None: outbound, or an allow-listed peer)
        self.queued_total = 0  # bytes ever queued
        self.sent_total = 0  # bytes ever written to the socket
        self.jobs: deque[PendingJob] = deque()
        self.worker = -1  # worker holding this connection's in-flight messages
        self.in_flight = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.messages_out = 0
        self.write_progress = 0.0  # last time queued bytes moved; 0: nothing queued
        self.registered_events = 0  # selector events this connection is registered for
        self.stats_slot = -1  # its slot in the stats block; -1: none yet, -2: refused one (asks again)
        self.stats_mark: tuple[object, ...] | None = None  # what its slot last showed (see MetricsLayer._write_stats)
        self.trace: ConnTrace | None = None  # the tcp.connect or tls.handshake span open on it, if traced

    @property
    def pending_bytes(self) -> int:
        return self.queued_total - self.sent_total

    @property
    def upgrading(self) -> bool:
        """A WebSocket waiting for its upgrade request: read in HANDSHAKE (any TLS handshake is done)."""
        ws = self.ws
        return ws is not None and not ws.open and (self.tls is not None or self.transport == "ws")

    def transition(self, new_state: ConnState) -> None:
        if new_state not in TRANSITIONS[self.state]:
            raise StateError(f"connection {self.id}: {self.state.value} -> {new_state.value} is not allowed")
        self.state = new_state

    def set_address(self, local: tuple[str, int]) -> None:
        """Record the local address once an outbound connect has bound one."""
        self.local = local
        self.prefix = message_prefix(self.id, self.transport, local, self.remote)

    def set_tls(self, info: TlsInfo) -> None:
        """Record the handshake's facts; workers get them in every message's envelope."""
        self.tls = info
        self.prefix = message_prefix(self.id, self.transport, self.local, self.remote, info.encode())

    def info(self, thread: int, now: float) -> ConnectionInfo:
        tls = self.tls
        return ConnectionInfo(
            id=self.id,
            state=self.state.value,
            transport=self.transport,
            local=format_address(self.local),
            remote=format_address(self.remote),
            thread=thread,
            outbound=self.outbound,
            age=round(now - self.created, 3),
            idle=round(now - self.last_activity, 3),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            pending_write_bytes=self.pending_bytes,
            in_flight=self.in_flight,
            tls_version=tls.version if tls else "",
            tls_cipher=tls.cipher if tls else "",
            tls_handshake_ms=tls.handshake_ms if tls else 0.0,
            tls_server_name=tls.server_name if tls else "",
            tls_peer_subject=tls.peer_subject if tls else "",
        )


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
