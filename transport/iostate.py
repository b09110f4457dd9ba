"""The state of one I/O thread, and the only entry points other threads may use.

:class:`~sipwire.transport.iothread.IOThread` is one selector loop whose code is
split by responsibility into layers, one class per module, each built on the
ones below it (the list is in ``transport/iothread.py``). This is the bottom
layer. Every attribute the layers share is declared and set here, once, with
its type, so ``mypy --strict`` checks each layer's use of it; no layer adds
state of its own (IOThread adds only its ``threading.Thread``).

Why layers of one object rather than collaborator objects: the per-message path
(read, frame, dispatch, flush) crosses responsibilities on every message. As
methods of one object those calls cost what they cost when the code was one
class (a method is found through the type's attribute cache whichever base
defines it), and the shared state stays one attribute hop away.

Also here: :meth:`IOState.post` and :meth:`IOState.load_hint`, which other
threads call (they make an I/O thread a :class:`~sipwire.transport.hub.ThreadHandle`),
and the registration of connections with the thread's poller (``transport/poller.py``)
that every layer needs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict, deque
from typing import Any, Final, Self

from sipwire.config import Settings
from sipwire.otel.recorder import SpanRecorder
from sipwire.transport.capture import CaptureRing
from sipwire.transport.connection import Connection, ConnState
from sipwire.transport.framing import FramerLimits
from sipwire.transport.hub import Hub
from sipwire.transport.poller import READ, WRITE, Poller
from sipwire.transport.ratelog import RateLimitedLog
from sipwire.transport.readbuffer import ReadBuffer
from sipwire.transport.stages import WORKER_STAGES, LatencyHistogram
from sipwire.transport.statsblock import HANDSHAKE_BUCKETS_MS, StatsWriter
from sipwire.transport.tls import TlsContexts
from sipwire.transport.wire import RecordReader
from sipwire.transport.wsframing import WsLimits

log = logging.getLogger("sipwire.transport")


#: Bytes asked for per recv: enough for dozens of pipelined messages per
#: call (batching is most of the speed) while bounding one read's work.
RECV_BYTES: Final = 262144
#: Seconds between timer scans (connect, per-message and idle timeouts).
TICK_SECONDS: Final = 0.25

#: What a registration's data ``(kind, target)`` names: a connection, a worker channel,
#: a listener (thread 0), or the inbox's eventfd.
KIND_CONN, KIND_CHANNEL, KIND_LISTENER, KIND_WAKE = range(4)


class WorkerChannel:
    """This thread's end of its socketpair with one worker."""

    __slots__ = ("backlog", "events", "out", "reader", "sent_at", "sock", "worker")

    def __init__(self, worker: int, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        self.reader = RecordReader()
        self.out: list[bytes] = []
        self.backlog = bytearray()  # bytes the kernel did not take on the last send
        # (monotonic time, message count) per batch sent, oldest first: the worker answers a
        # channel's messages in order, so DONE counts consume it from the left (dispatch latency).
        self.sent_at: deque[tuple[float, int]] = deque()
        self.events = READ

    @property
    def backlog_bytes(self) -> int:
        """Bytes the worker has not taken yet: the sign of a slow or stuck worker.

        ``out`` is not counted: it is flushed at the end of every loop pass.
        """
        return len(self.backlog)


class IOState:
    """An I/O thread's state; see the module docstring."""

    def __init__(self, index: int, hub: Hub[Self]) -> None:
        self.index: int = index
        self.hub: Hub[Self] = hub
        settings = hub.settings
        self.settings: Settings = settings
        self.limits: FramerLimits = FramerLimits(settings.max_message_bytes, settings.max_header_bytes)
        self.ws_limits: WsLimits = WsLimits(
            settings.max_message_bytes, settings.ws_max_frame_bytes, settings.allowed_origins
        )
        self.selector: Poller = Poller()
        self.inbox: deque[tuple[str, tuple[Any, ...]]] = deque()
        # Guards only the hand-over of the inbox when the thread ends.
        self._inbox_lock: threading.Lock = threading.Lock()
        self._wake_fd: int = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.selector.register(self._wake_fd, READ, (KIND_WAKE, None))
        self.conns: dict[int, Connection] = {}
        self.channels: list[WorkerChannel | None] = [None] * hub.worker_count
        self.outstanding: list[int] = [0] * hub.worker_count
        self.pending_write_bytes: int = 0
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.ratelog: RateLimitedLog = RateLimitedLog(log)
        self._dirty_conns: dict[int, Connection] = {}
        self._dirty_channels: set[WorkerChannel] = set()
        self._lazy_channels: set[WorkerChannel] = set()  # hold outcomes nobody waits for
        self._handshake_buckets: list[int] = [0] * (len(HANDSHAKE_BUCKETS_MS) + 1)
        self._ws_handshake_buckets: list[int] = [0] * (len(HANDSHAKE_BUCKETS_MS) + 1)  # WebSocket upgrades
        # Stats block (transport/statsblock.py): this thread's record, written from _tick, and the
        # latency histograms the supervisor sums (see stats_totals).
        self._stats: StatsWriter | None = hub.stats
        self.stats_record: int = hub.thread_records.take() if hub.stats is not None else -1
        self._started: float = time.monotonic()
        self.done_by_worker: list[int] = [0] * hub.worker_count
        # Where messages' time goes (transport/stages.py): the stages this thread times, and the
        # workers' stages added up from their STAGES records.
        self._read_framed = LatencyHistogram()
        self._dispatch_latency = LatencyHistogram()
        self._write_latency = LatencyHistogram()
        self._worker_stages = tuple(LatencyHistogram() for _ in WORKER_STAGES)
        self._parked: list[tuple[int, list[bytes]]] = []  # messages waiting for any live worker
        # Ids of connections closed in this loop pass that carried messages: announced to every worker.
        self._closed_ids: list[int] = []
        self._listeners: list[socket.socket] = []
        self._tls: TlsContexts | None = hub.tls
        # Telemetry (None when off): the recorder, and the same object only when traces are recorded.
        self._recorder: SpanRecorder | None = hub.recorder
        self._tracing: SpanRecorder | None = hub.recorder if hub.recorder is not None and hub.recorder.tracing else None
        self._capture: CaptureRing | None = hub.capture  # the call-flow capture; None when off
        self._reader: ReadBuffer = ReadBuffer(RECV_BYTES)
        self._now: float = time.monotonic()
        self._next_tick: float = self._now + TICK_SECONDS
        self._busy: float = 0.0
        self._load: float = 0.0
        self._lag: float = 0.0
        self._load_window_start: float = self._now
        self._jobs: int = 0
        self._running: bool = True
        self._retire_deadline: float = 0.0
        self._shutdown_deadline: float = 0.0
        # Read gates (fairness and backpressure, see _update_events).
        self._write_queue_cap: int = settings.write_queue_bytes
        self._max_in_flight: int = settings.max_in_flight_per_connection
        self.alive: bool = True

    # -- cross-thread API: the only entry points other threads may call ----------------------

    def post(self, method: str, *args: Any) -> None:
        """Run ``self.<method>(*args)`` on this thread; a finished thread hands it to thread 0."""
        with self._inbox_lock:
            if self.alive:
                self.inbox.append((method, args))
                os.eventfd_write(self._wake_fd, 1)
                return
        first = self.hub.threads[0]
        if first is not self and first.alive:
            first.post(method, *args)

    def load_hint(self) -> int:
        """Connections owned plus jobs waiting: what 'least loaded' compares."""
        return len(self.conns) + len(self.inbox)

    # -- selector registration of connections --------------------------------------------------

    def _update_events(self, conn: Connection) -> None:
        """Register exactly the selector events the connection's state and stream need.

        An open connection is read only while it keeps within its bounds: messages
        waiting beyond ``max_in_flight_per_connection`` (fairness between peers) and
        ``write_queue_bytes`` queued for it, the transport's own answers and pongs
        included (a peer that never reads stops being read). TCP flow control then
        slows the peer down; nothing it sends piles up here.
        """
        state = conn.state
        if state is ConnState.OPEN:
            events = WRITE if conn.out_chunks else 0
            if self._shutdown_deadline:
                pass
            elif conn.held:
                events |= self._gate_closed(conn, "paused.in_flight")
            elif conn.pending_bytes >= self._write_queue_cap:
                events |= self._gate_closed(conn, "paused.write_queue")
            else:
                events |= READ
        elif state is ConnState.CLOSING:
            events = WRITE if conn.out_chunks else 0
        elif state is ConnState.CONNECTING:
            events = WRITE
        elif state is ConnState.HANDSHAKE:
            events = READ if conn.upgrading else 0  # TLS: the stream's wants; a WebSocket upgrade: its request
        else:
            return
        self._set_events(conn, events | conn.stream.wants)

    def _gate_closed(self, conn: Connection, counter: str) -> int:
        """Count a connection that stops being read (once per pause); the events to add: none."""
        if conn.registered_events & READ:
            self.counters[counter] += 1
        return 0

    def _set_events(self, conn: Connection, events: int) -> None:
        current = conn.registered_events
        if events == current:
            return
        if not events:
            self.selector.unregister(conn.sock)
        elif not current:
            self.selector.register(conn.sock, events, (KIND_CONN, conn))
        else:
            self.selector.modify(conn.sock, events, (KIND_CONN, conn))
        conn.registered_events = events

    def _release(self, conn: Connection, closing: bool = False) -> None:
        """Stop owning ``conn``: it is moving to another thread, or (``closing``) its socket closes next."""
        if closing:
            self.selector.forget(conn.sock)  # the close takes it out of the epoll set: no epoll_ctl for it
            conn.registered_events = 0
        else:
            self._set_events(conn, 0)
        del self.conns[conn.id]
        self._dirty_conns.pop(conn.id, None)
        self.pending_write_bytes -= conn.pending_bytes
