"""The I/O threads' side of transport tracing: sampling, ids and a bounded queue of plain tuples.

Theory of operation
    An I/O thread must not build SDK spans: a span object, its attribute
    dict, the processor's locks and above all the OTLP encoding cost tens
    of microseconds per span, and that time would be taken from SIP traffic.
    So the I/O thread does only what cannot be done later: it decides
    whether a received message starts a recorded trace (the root sampler),
    makes the trace and span ids (they travel in the MESSAGE record to the
    worker), reads the clock, and appends one tuple per finished span to
    :attr:`SpanRecorder.queue`. The telemetry thread (:mod:`otel.pipeline`)
    pops the tuples and ships them, in batches, to the exporter process
    (:mod:`otel.exporter`), where the SDK spans are built and exported. The
    worker records its ``sip.route`` spans the same way.

    The queue is bounded: when it holds :attr:`SpanRecorder.limit` records,
    new ones are dropped and counted in :attr:`SpanRecorder.dropped` (the
    lock guarding that count is taken only when dropping). ``deque.append``
    and ``popleft`` are atomic, so any number of I/O threads can record
    while the telemetry thread drains. The bound may be exceeded by at most
    one record per I/O thread (the length check and the append are not one
    step), which is still a bound.

    Workers record their spans the same way, and ship them to the transport
    in SPANS records over their channels (``transport/wire.py``); an I/O
    thread hands such a batch, still marshalled, to :meth:`SpanRecorder.forward`,
    a second bounded queue (bounded in spans) that the telemetry thread
    drains next to the first. So one telemetry thread and one exporter
    process per instance see every span of a trace.

    A rate limit (the ``trace_rate_limit`` setting) bounds the traces started
    per second, so at any message rate tracing costs at most that many
    traces' work (messages past it are counted in
    :attr:`SpanRecorder.rate_limited`). When the exporter cannot keep up,
    the queues fill before they drop:
    past three quarters of :attr:`SpanRecorder.limit` the root sampler
    says no (counted in :attr:`SpanRecorder.shed`) until they drain. A
    trace is then kept whole or not started at all, and the SIP processes
    stop paying for spans nobody would export.

    Only sampled traces produce anything: an unsampled message gets an empty
    trace context, so the worker makes no span and its write jobs carry no
    context either. No ids are made for it.

    Nothing here imports OpenTelemetry; the W3C ``traceparent`` text is
    written and parsed by hand (version ``00``, sampled flag), and
    :mod:`tests.test_otel` checks it against the SDK's propagator.

Fork safety
    A forked child starts with an empty queue and a zero drop count (the
    parent's records are the parent's to export).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final, Protocol


class TlsFacts(Protocol):
    """The TLS facts a span carries (the transport's ``TlsInfo`` has them)."""

    @property
    def version(self) -> str: ...
    @property
    def cipher(self) -> str: ...


class Endpoints(Protocol):
    """The network facts every span carries: transport name and both addresses.

    Protocols rather than imports keep telemetry below the transport:
    ``sipwire.otel`` never imports ``sipwire.transport``.
    """

    @property
    def transport(self) -> str: ...
    @property
    def local(self) -> tuple[str, int]: ...
    @property
    def remote(self) -> tuple[str, int]: ...


class TracedConnection(Endpoints, Protocol):
    """What a span reads of a connection; the transport's ``Connection`` has it."""

    @property
    def id(self) -> int: ...
    @property
    def tls(self) -> TlsFacts | None: ...
    @property
    def outbound(self) -> bool: ...


#: Span kinds recorded by the transport (first field of a record).
SPAN_RECEIVE: Final = 0
SPAN_WRITE: Final = 1
SPAN_CONNECT: Final = 2
SPAN_HANDSHAKE: Final = 3
SPAN_ROUTE: Final = 4  # recorded by the worker
SPAN_UPGRADE: Final = 5
SPAN_NAMES: Final = ("sip.receive", "sip.write", "tcp.connect", "tls.handshake", "sip.route", "ws.upgrade")

#: A finished span as an I/O thread (or the worker) records it, fields in this order:
#: kind, trace id, span id, parent span id (0: root), start and end (UNIX ns), conn id (0: none),
#: transport, local address, remote address, TLS (version, cipher), outbound connection?,
#: error type ("" when ok), error detail, more attributes (the worker's ``sip.*``) or None.
#: Only plain values: records cross to the exporter process with :mod:`marshal`.
SpanRecord = tuple[
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    str,
    "tuple[str, int] | None",
    "tuple[str, int] | None",
    "tuple[str, str] | None",
    bool,
    str,
    str,
    "dict[str, str | int] | None",
]
#: A span made with the OpenTelemetry API (a router's own), as the worker ships it:
#: name, span kind value, trace id, span id, parent span id, start and end (UNIX ns), attributes,
#: status code value, status description.
ApiSpanRecord = tuple[str, int, int, int, int, int, int, "Mapping[str, object]", int, str]

#: Trace ids are 128 bits; the ratio rule looks at the low 64 (as the SDK's TraceIdRatioBased does).
_LOW_64: Final = (1 << 64) - 1
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")


def ratio_bound(ratio: float) -> int:
    """The exclusive upper bound on a trace id's low 64 bits for ``ratio`` (the SDK's formula)."""
    return round(max(0.0, min(1.0, ratio)) * (_LOW_64 + 1))


def traceparent(trace_id: int, span_id: int) -> bytes:
    """The W3C ``traceparent`` of a sampled span (version 00, flags 01), as ASCII bytes."""
    return b"00-%032x-%016x-01" % (trace_id, span_id)


def parse_traceparent(value: str) -> tuple[int, int] | None:
    """(trace id, span id) of a valid, sampled W3C ``traceparent``; None for anything else."""
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id or not int(flags_hex, 16) & 1:
        return None
    return trace_id, span_id


class WriteTrace:
    """A traced write job on its way to its outcome (travels with the job, across threads)."""

    __slots__ = ("local", "parent_id", "remote", "span_id", "start_ns", "trace_id", "transport")

    def __init__(self, trace_id: int, parent_id: int, span_id: int, start_ns: int) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = span_id
        self.start_ns = start_ns
        # Filled in once the job meets its connection (or names its destination).
        self.transport = ""
        self.local: tuple[str, int] | None = None
        self.remote: tuple[str, int] | None = None


class ConnTrace:
    """The connect or handshake span a connection has open (travels with the connection)."""

    __slots__ = ("kind", "parent_id", "span_id", "start_ns", "trace_id")

    def __init__(self, kind: int, trace_id: int, parent_id: int, span_id: int, start_ns: int) -> None:
        self.kind = kind
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = span_id
        self.start_ns = start_ns


class SpanRecorder:
    """Sampling, ids and the bounded record queue shared by every I/O thread; see the module docstring."""

    def __init__(
        self, ratio: float, limit: int, *, tracing: bool = True, metrics: bool = False, rate_limit: int = 0
    ) -> None:
        #: Record spans (else only handshake durations for metrics, and no ids are ever made).
        self.tracing = tracing
        #: Record TLS handshake durations into :attr:`handshakes`.
        self.metrics = metrics
        self.ratio = ratio
        self.limit = limit
        self.queue: deque[SpanRecord | ApiSpanRecord] = deque()
        #: Workers' span batches, as their SPANS records carried them: (worker index, pid, spans, payload).
        self.forwarded: deque[tuple[int, int, int, bytes]] = deque()
        #: Spans in :attr:`forwarded` (changed under the drop lock; the bound is :attr:`limit`).
        self.forwarded_spans = 0
        #: Workers' spans dropped because :attr:`forwarded` was full.
        self.forward_dropped = 0
        #: (seconds, TLS version, error type) of finished handshakes, for the duration histogram.
        self.handshakes: deque[tuple[float, str, str]] = deque()
        self.dropped = 0
        #: Messages the sampler would have traced, left untraced because the queues were nearly full.
        self.shed = 0
        #: Traces started per second at most (0: no limit), and the messages left untraced past it.
        self.rate_limit = rate_limit
        self.rate_limited = 0
        self._second = 0  # the current one-second window (monotonic seconds), and traces started in it
        self._started = 0
        self._shed_at = max(1, limit * 3 // 4)
        self._bound = ratio_bound(ratio)
        self._wake_at = max(1, limit // 2)
        self._wake: Callable[[], None] | None = None
        self._drop_lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            weak_reset = weakref.WeakMethod(self._reset_after_fork)

            def _after_in_child() -> None:
                reset = weak_reset()
                if reset is not None:
                    reset()

            os.register_at_fork(after_in_child=_after_in_child)

    def set_wake(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (cheaply, from an I/O thread) when the queue reaches half its limit."""
        self._wake = wake

    def _reset_after_fork(self) -> None:
        self.queue = deque()
        self.handshakes = deque()
        self.forwarded = deque()
        self.forwarded_spans = 0
        self.forward_dropped = 0
        self.dropped = 0
        self.shed = 0
        self.rate_limited = 0
        self._drop_lock = threading.Lock()

    # -- ids and sampling ----------------------------------------------------------------------

    def root_trace_id(self) -> int:
        """A new trace id when the root sampler keeps this trace (and the queues have room), else 0.

        The low 64 bits are drawn first and compared with the ratio bound, so a
        kept id passes the SDK's ``TraceIdRatioBased`` check for the same ratio.
        """
        low = random.getrandbits(64)
        if low >= self._bound:
            return 0
        if len(self.queue) >= self._shed_at or self.forwarded_spans >= self._shed_at:
            with self._drop_lock:
                self.shed += 1
            return 0
        if self.rate_limit and not self._within_rate():
            return 0
        return ((random.getrandbits(64) or 1) << 64) | low

    def _within_rate(self) -> bool:
        """One more trace this second? (Threads race on the window's count: the limit is approximate.)"""
        second = int(time.monotonic())
        if second != self._second:
            self._second = second
            self._started = 0
        self._started += 1
        if self._started <= self.rate_limit:
            return True
        with self._drop_lock:
            self.rate_limited += 1
        return False

    @staticmethod
    def new_span_id() -> int:
        return random.getrandbits(64) or 1

    # -- recording -----------------------------------------------------------------------------

    def put(self, record: SpanRecord | ApiSpanRecord) -> None:
        """Queue a finished span, or drop and count it when the queue is full."""
        queue = self.queue
        if len(queue) >= self.limit:
            with self._drop_lock:
                self.dropped += 1
            return
        queue.append(record)
        if len(queue) == self._wake_at and self._wake is not None:
            self._wake()

    def forward(self, worker: int, pid: int, count: int, payload: bytes) -> None:
        """Queue a worker's batch of ``count`` marshalled spans for the exporter, or drop and count it when full."""
        with self._drop_lock:  # one lock per batch, not per span; I/O threads add, the telemetry thread takes
            if self.forwarded_spans + count > self.limit:
                self.forward_dropped += count
                return
            self.forwarded_spans += count
        self.forwarded.append((worker, pid, count, payload))
        if self._wake is not None and self.forwarded_spans >= self._wake_at:
            self._wake()

    def take_forwarded(self) -> tuple[int, int, int, bytes] | None:
        """The oldest forwarded batch (telemetry thread), or None."""
        try:
            batch = self.forwarded.popleft()
        except IndexError:
            return None
        with self._drop_lock:
            self.forwarded_spans -= batch[2]
        return batch

    def handshake(self, seconds: float, version: str, error: str) -> None:
        """A finished TLS handshake for the duration histogram (dropped and counted when full)."""
        if len(self.handshakes) >= self.limit:
            with self._drop_lock:
                self.dropped += 1
            return
        self.handshakes.append((seconds, version, error))

    def receive(
        self, trace_id: int, span_id: int, start_ns: int, end_ns: int, conn: TracedConnection, error: str
    ) -> None:
        """``sip.receive``: the read that completed a message, its framing and dispatch."""
        tls = conn.tls
        self.put(
            (SPAN_RECEIVE, trace_id, span_id, 0, start_ns, end_ns, conn.id, conn.transport, conn.local, conn.remote,
             (tls.version, tls.cipher) if tls is not None else None, conn.outbound, error, "", None)
        )  # fmt: skip

    def start_write(self, context: str) -> WriteTrace | None:
        """The trace of a write job whose WRITE record carries ``context``; None when not traced."""
        parsed = parse_traceparent(context)
        if parsed is None:
            return None
        return WriteTrace(parsed[0], parsed[1], self.new_span_id(), time.time_ns())

    def end_write(self, trace: WriteTrace, conn_id: int, error: str, detail: str) -> None:
        """``sip.write``: the job from its WRITE record to its outcome (``error`` is the outcome label)."""
        self.put(
            (SPAN_WRITE, trace.trace_id, trace.span_id, trace.parent_id, trace.start_ns, time.time_ns(), conn_id,
             trace.transport, trace.local, trace.remote, None, True, error, detail, None)
        )  # fmt: skip

    def start_connection(self, kind: int, job: WriteTrace | None) -> ConnTrace | None:
        """Open a ``tcp.connect``, ``tls.handshake`` or ``ws.upgrade`` span: child of ``job``'s write span, else a
        new root."""
        if job is not None:
            return ConnTrace(kind, job.trace_id, job.span_id, self.new_span_id(), time.time_ns())
        trace_id = self.root_trace_id()
        if not trace_id:
            return None
        return ConnTrace(kind, trace_id, 0, self.new_span_id(), time.time_ns())

    def end_connection(self, trace: ConnTrace, conn: TracedConnection, error: str, detail: str) -> None:
        """Close ``trace``'s span with the connection's facts as they are now."""
        tls = conn.tls
        self.put(
            (trace.kind, trace.trace_id, trace.span_id, trace.parent_id, trace.start_ns, time.time_ns(), conn.id,
             conn.transport, conn.local, conn.remote, (tls.version, tls.cipher) if tls is not None else None,
             conn.outbound, error, detail, None)
        )  # fmt: skip

    def end_unconnected(
        self, trace: ConnTrace, transport: str, remote: tuple[str, int], error: str, detail: str
    ) -> None:
        """Close a ``tcp.connect`` span whose connect failed before a connection existed."""
        self.put(
            (trace.kind, trace.trace_id, trace.span_id, trace.parent_id, trace.start_ns, time.time_ns(), 0,
             transport, None, remote, None, True, error, detail, None)
        )  # fmt: skip

    def next_phase(self, trace: ConnTrace, kind: int) -> ConnTrace:
        """The span that follows ``trace`` on the same connection (TCP connected: the TLS handshake)."""
        return ConnTrace(kind, trace.trace_id, trace.parent_id, self.new_span_id(), time.time_ns())

    def after(self, trace: ConnTrace, kind: int) -> ConnTrace:
        """A span that ``trace`` led to, as its child (an accepted WSS connection's TLS handshake: its upgrade)."""
        return ConnTrace(kind, trace.trace_id, trace.span_id, self.new_span_id(), time.time_ns())
