"""An I/O thread: one selector loop that owns its connections and its worker channels.

Everything a connection needs happens here, on its owning thread: accept
hand-off, non-blocking connect, reads, framing, dispatch to a worker,
write jobs, timers and close. Other threads reach this one only through
:meth:`IOThread.post`, which appends ``(method name, args)`` to the inbox
and wakes the selector through an eventfd.

One loop pass:
  1. ``select`` with a timeout up to the next timer tick;
  2. handle ready sockets: connections (read, frame, batch messages per
     worker), worker channels (write jobs, done counts), the listener
     (thread 0 only), the inbox;
  3. flush every connection that got replies (one ``send`` per connection)
     and every channel that got messages (one ``send`` per channel);
  4. on a tick: connect timeouts, per-message timeouts, idle connections.

Jobs about a connection this thread does not own (it moved or closed) are
forwarded to the owner found in the hub, or reported as ``connection_gone``.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import ipaddress
import logging
import os
import selectors
import socket
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final

from sipwire.otel.recorder import SPAN_CONNECT, SPAN_HANDSHAKE, SpanRecorder, WriteTrace, traceparent
from sipwire.transport.connection import Connection, ConnectionInfo, ConnState, PendingJob
from sipwire.transport.framing import PONG, Event, FramerLimits, FramingError, FramingErrorReason, Ping
from sipwire.transport.hub import DestinationKey, Hub
from sipwire.transport.outcome import WriteResult
from sipwire.transport.ratelog import RateLimitedLog
from sipwire.transport.readbuffer import ReadBuffer
from sipwire.transport.sip import response_for_unparsable
from sipwire.transport.statsblock import LATENCY_BUCKETS_MS, THREAD_ACTIVE, THREAD_RETIRING
from sipwire.transport.streams import ERRNO_RESULTS, StreamError, TcpStream, TlsStream
from sipwire.transport.tls import TlsVerifyError, connection_info, verify_server_name
from sipwire.transport.wire import (
    FLAG_PROMPT_OUTCOME,
    CloseRecord,
    CountRecord,
    DoneRecord,
    RecordReader,
    WireError,
    WriteRecord,
    encode_message,
    encode_outcome,
)

log = logging.getLogger("sipwire.transport")

READ: Final = selectors.EVENT_READ
WRITE: Final = selectors.EVENT_WRITE

#: Bytes asked for per recv: enough for dozens of pipelined messages per
#: call (batching is most of the speed) while bounding one read's work.
RECV_BYTES: Final = 262144
#: Connections accepted per listener wake-up before other sockets get a turn.
ACCEPT_BATCH: Final = 64
#: Seconds between timer scans (connect, per-message and idle timeouts).
TICK_SECONDS: Final = 0.25

_CONN, _CHANNEL, _LISTENER, _WAKE = range(4)

#: Upper bounds (ms) of the TLS handshake duration histogram; one more bucket counts the rest.
HANDSHAKE_BUCKETS_MS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)

_FRAMING_ANSWERS: Final = {
    FramingErrorReason.MESSAGE_TOO_LARGE: (413, "Request Entity Too Large"),
    FramingErrorReason.HEADERS_TOO_LARGE: (513, "Message Too Large"),
}


@dataclass(frozen=True, slots=True)
class ThreadStatistics:
    """What one I/O thread reports: load, connections, queues, counters."""

    index: int
    connections: int
    load: float
    queue_depth: int
    jobs: int
    loop_lag_ms: float
    pending_write_bytes: int
    outstanding: tuple[int, ...]
    counters: dict[str, int]
    handshake_buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ThreadTotals:
    """Copies of one thread's cumulative figures, for the supervisor's stats-block writes."""

    counters: dict[str, int]
    handshake_buckets: list[int]
    dispatch_buckets: list[int]
    dispatch_ms: float
    write_buckets: list[int]
    write_ms: float
    done_by_worker: list[int]
    outstanding: list[int]
    inbox_depth: int


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


class IOThread:
    """A selector loop owning a set of connections; see the module docstring."""

    def __init__(self, index: int, hub: Hub) -> None:
        self.index = index
        self.hub = hub
        settings = hub.settings
        self.settings = settings
        self.limits = FramerLimits(settings.max_message_bytes, settings.max_header_bytes)
        self.selector = selectors.DefaultSelector()
        self.inbox: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._inbox_lock = threading.Lock()  # guards only the hand-over of the inbox when the thread ends
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.selector.register(self._wake_fd, READ, (_WAKE, None))
        self.conns: dict[int, Connection] = {}
        self.channels: list[WorkerChannel | None] = [None] * hub.worker_count
        self.outstanding: list[int] = [0] * hub.worker_count
        self.pending_write_bytes = 0
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.ratelog = RateLimitedLog(log)
        self._dirty_conns: dict[int, Connection] = {}
        self._dirty_channels: set[WorkerChannel] = set()
        self._lazy_channels: set[WorkerChannel] = set()  # hold outcomes nobody waits for
        self._handshake_buckets = [0] * (len(HANDSHAKE_BUCKETS_MS) + 1)
        # Stats block (transport/statsblock.py): this thread's record, written from _tick, and the
        # latency histograms the supervisor sums (see stats_totals).
        self._stats = hub.stats
        self.stats_record = hub.thread_records.take() if hub.stats is not None else -1
        self._started = time.monotonic()
        self.done_by_worker = [0] * hub.worker_count
        self._dispatch_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._dispatch_ms = 0.0
        self._write_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._write_ms = 0.0
        self._parked: list[tuple[int, list[bytes]]] = []  # messages waiting for any live worker
        self._listeners: list[socket.socket] = []
        self._tls = hub.tls
        # Telemetry (None when off): the recorder, and the same object only when traces are recorded.
        self._recorder: SpanRecorder | None = hub.recorder
        self._tracing = hub.recorder if hub.recorder is not None and hub.recorder.tracing else None
        self._reader = ReadBuffer(RECV_BYTES)
        self._now = time.monotonic()
        self._next_tick = self._now + TICK_SECONDS
        self._busy = 0.0
        self._load = 0.0
        self._lag = 0.0
        self._load_window_start = self._now
        self._jobs = 0
        self._running = True
        self._retire_deadline = 0.0
        self._shutdown_deadline = 0.0
        self.alive = True
        self.thread = threading.Thread(target=self._run, name=f"sipwire-io-{index}", daemon=True)

    # -- cross-thread API: the only entry points other threads may call ----------------------

    def start(self) -> None:
        self.thread.start()

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

    # -- loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("I/O thread %d crashed", self.index)
            raise
        finally:
            self._finish()

    def _loop(self) -> None:
        monotonic = time.monotonic
        select = self.selector.select
        conns = self.conns
        while self._running:
            timeout = max(0.0, self._next_tick - monotonic())
            events = select(timeout)
            started = self._now = monotonic()
            for key, mask in events:
                kind, target = key.data
                if kind == _CONN:
                    conn: Connection = target
                    if conns.get(conn.id) is not conn:
                        continue  # moved away (retire) or closed earlier in this same pass
                    if conn.state is ConnState.HANDSHAKE:
                        self._handshake(conn)
                        continue
                    if mask & READ:
                        self._read(conn)
                    if mask & WRITE and conn.state is not ConnState.CLOSED:
                        self._writable(conn)
                elif kind == _CHANNEL:
                    if mask & READ:
                        self._read_channel(target)
                    if mask & WRITE:
                        self._send_channel(target)
                elif kind == _LISTENER:
                    self._accept(*target)
                else:
                    self._drain_inbox()
            if self._dirty_conns:
                dirty = self._dirty_conns
                self._dirty_conns = {}
                for conn in dirty.values():
                    self._flush(conn)
            if self._dirty_channels:
                channels = self._dirty_channels
                self._dirty_channels = set()
                for channel in channels:
                    self._send_channel(channel)
            now = monotonic()
            self._busy += now - started
            if now >= self._next_tick:
                self._lag = max(0.0, now - self._next_tick)
                self._tick(now)

    def _drain_inbox(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)
        inbox = self.inbox
        while inbox:
            method, args = inbox.popleft()
            self._jobs += 1
            getattr(self, method)(*args)

    def _finish(self) -> None:
        """Close what is left; anything posted after this is handled by thread 0."""
        for conn in list(self.conns.values()):
            self._close(conn, "transport stopping", WriteResult.SHUTDOWN)
        for channel in self.channels:
            if channel is not None:
                self._drop_channel(channel, lost_reason="transport stopping")
        for listener in self._listeners:
            listener.close()
        with self._inbox_lock:
            self.alive = False
            leftovers = list(self.inbox)
            self.inbox.clear()
        self.selector.close()
        os.close(self._wake_fd)
        first = self.hub.threads[0] if self.hub.threads else self
        if first is not self and first.alive:
            for method, args in leftovers:
                first.post(method, *args)

    # -- reading and dispatch ------------------------------------------------------------------

    def _read(self, conn: Connection) -> None:
        stream = conn.stream
        read_ns = time.time_ns() if self._tracing is not None else 0  # a sip.receive span starts at its read
        try:
            data = stream.recv(self._reader)
        except StreamError as error:
            self._close(conn, error.reason, error.result)
            return
        if stream.wants:  # TLS: the read needs a write, or a blocked write waited for this read
            if conn.out_chunks:
                self._dirty_conns[conn.id] = conn
            self._update_events(conn)
        if data is None:
            return
        if not data:
            self._close(conn, "closed by peer", WriteResult.CONNECTION_GONE)
            return
        conn.bytes_in += len(data)
        conn.last_activity = self._now
        framer = conn.framer
        try:
            events = framer.feed(data)
        except FramingError as error:
            if error.events:  # good messages pipelined ahead of the bad one still count
                self._dispatch(conn, error.events, read_ns)
            self._framing_error(conn, error)
            return
        if events:
            self._dispatch(conn, events, read_ns)
        if framer.buffered_bytes and framer.in_message:
            if events or not conn.message_started:
                conn.message_started = self._now  # completed events consumed the old partial: a new one began
        else:
            conn.message_started = 0.0

    def _dispatch(self, conn: Connection, events: list[Event], read_ns: int = 0) -> None:
        received_at = time.time()
        records: list[bytes] = []
        prefix = conn.prefix
        tracing = self._tracing
        traced: list[tuple[int, int]] = []  # (trace id, span id) of the sampled messages
        for event in events:
            if isinstance(event, Ping):
                self.counters["keepalive_pings"] += 1
                self._enqueue(conn, PONG, 0, -1)
            elif tracing is None:
                records.append(encode_message(prefix, received_at, b"", event))
            else:
                trace_id = tracing.root_trace_id()
                context = b""
                if trace_id:
                    span_id = tracing.new_span_id()
                    traced.append((trace_id, span_id))
                    context = traceparent(trace_id, span_id)
                records.append(encode_message(prefix, received_at, context, event))
        if not records:
            return
        count = len(records)
        conn.messages_in += count
        self.counters["messages_in"] += count
        # Keep a connection's messages on the worker that holds its earlier ones (or parked
        # behind them while no worker is alive), so they are processed in arrival order.
        worker = conn.worker
        if not conn.in_flight or (worker >= 0 and self.channels[worker] is None):
            worker = self._least_busy_worker()
        if worker < 0:
            self._park(conn, records)
            if traced:
                self._received(conn, traced, read_ns, "")
            return
        channel = self.channels[worker]
        assert channel is not None
        if channel.backlog_bytes > self.settings.dispatch_backlog_bytes:
            self._reject_overload(conn, events)
            if traced:
                self._received(conn, traced, read_ns, "overload")
            return
        channel.out.extend(records)
        self._dirty_channels.add(channel)
        conn.worker = worker
        conn.in_flight += count
        self.outstanding[worker] += count
        channel.sent_at.append((time.monotonic(), count))
        if traced:
            self._received(conn, traced, read_ns, "")

    def _received(self, conn: Connection, traced: list[tuple[int, int]], read_ns: int, error: str) -> None:
        """Record the ``sip.receive`` spans of the sampled messages of one read."""
        tracing = self._tracing
        assert tracing is not None
        end_ns = time.time_ns()
        start_ns = read_ns or end_ns
        for trace_id, span_id in traced:
            tracing.receive(trace_id, span_id, start_ns, end_ns, conn, error)

    def _least_busy_worker(self) -> int:
        best = -1
        best_load = 1 << 62
        outstanding = self.outstanding
        for index, channel in enumerate(self.channels):
            if channel is not None and outstanding[index] < best_load:
                best, best_load = index, outstanding[index]
        return best

    def _park(self, conn: Connection, records: list[bytes]) -> None:
        """Hold messages while no worker is alive (a restart is under way), within the backlog cap."""
        parked_bytes = sum(len(r) for _, batch in self._parked for r in batch)
        if parked_bytes > self.settings.dispatch_backlog_bytes:
            self.counters["lost_messages"] += len(records)
            self.ratelog.log(
                logging.ERROR, "park", "no live worker and park buffer full: %d messages lost", len(records)
            )
            return
        self._parked.append((conn.id, records))
        conn.in_flight += len(records)

    def _reject_overload(self, conn: Connection, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, bytes):
                answer = response_for_unparsable(event, 503, "Service Unavailable (worker backlog full)")
                self.counters["overload_rejected"] += 1
                if answer is not None:
                    self._enqueue(conn, answer, 0, -1)
        self.ratelog.log(
            logging.WARNING,
            "overload",
            "worker backlog above %d bytes: answering 503",
            self.settings.dispatch_backlog_bytes,
        )

    def _framing_error(self, conn: Connection, error: FramingError) -> None:
        self.counters[f"framing_error.{error.reason.value}"] += 1
        self.ratelog.log(
            logging.WARNING, f"framing.{error.reason.value}",
            "closing connection %d from %s:%d: %s", conn.id, conn.remote[0], conn.remote[1], error,
        )  # fmt: skip
        status, reason = _FRAMING_ANSWERS.get(error.reason, (400, "Bad Request"))
        answer = response_for_unparsable(error.header_block, status, f"{reason} ({error.reason.value})")
        if answer is not None:
            self._enqueue(conn, answer, 0, -1)
        self._close_after_flush(conn)

    # -- worker channels -----------------------------------------------------------------------

    def _read_channel(self, channel: WorkerChannel) -> None:
        try:
            data = self._reader.recv(channel.sock)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_channel(channel, lost_reason="worker exited")
            return
        try:
            records = channel.reader.feed(data)
        except WireError as error:
            log.error("I/O thread %d: corrupt channel from worker %d: %s", self.index, channel.worker, error)
            self._drop_channel(channel, lost_reason="corrupt channel")
            return
        worker = channel.worker
        finished = 0
        for record in records:
            if type(record) is WriteRecord:
                self._write_job(worker, record)
            elif type(record) is DoneRecord:
                self.outstanding[worker] -= record.messages
                finished += record.messages
                self._done(record.conn_id, record.messages)
            elif type(record) is CountRecord:
                self.counters[record.name] += record.delta
            elif type(record) is CloseRecord and (conn := self.conns.get(record.conn_id)) is not None:
                self._close_after_flush(conn)
        if finished:
            self._dispatch_done(channel, finished)

    def _dispatch_done(self, channel: WorkerChannel, finished: int) -> None:
        """Dispatch latency of ``finished`` messages: the oldest ones sent on ``channel``."""
        self.done_by_worker[channel.worker] += finished
        now = time.monotonic()
        sent_at = channel.sent_at
        buckets = self._dispatch_buckets
        while finished and sent_at:
            sent, count = sent_at[0]
            taken = min(count, finished)
            if taken == count:
                sent_at.popleft()
            else:
                sent_at[0] = (sent, count - taken)
            elapsed_ms = (now - sent) * 1000.0
            buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, elapsed_ms)] += taken
            self._dispatch_ms += elapsed_ms * taken
            finished -= taken

    def _send_channel(self, channel: WorkerChannel) -> None:
        if self.channels[channel.worker] is not channel:
            return
        data: bytes | bytearray = channel.backlog
        if channel.out:
            joined = b"".join(channel.out)
            channel.out.clear()
            if channel.backlog:
                channel.backlog += joined  # a slow worker: append, never re-copy the whole backlog
            else:
                data = joined
        if not data:
            return
        try:
            sent = channel.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop_channel(channel, lost_reason="worker exited")
            return
        if data is channel.backlog:
            del channel.backlog[:sent]  # bytearray drops its front without moving the rest
        elif sent < len(data):
            channel.backlog = bytearray(memoryview(data)[sent:])
        events = READ | WRITE if channel.backlog else READ
        if events != channel.events:
            channel.events = events
            self.selector.modify(channel.sock, events, (_CHANNEL, channel))

    def _drop_channel(self, channel: WorkerChannel, lost_reason: str) -> None:
        worker = channel.worker
        if self.channels[worker] is not channel:
            return
        self.channels[worker] = None
        self._dirty_channels.discard(channel)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(channel.sock)
        channel.sock.close()
        lost = self.outstanding[worker]
        self.outstanding[worker] = 0
        if lost and lost_reason:
            self.counters["lost_messages"] += lost
            log.error(
                "worker %d: %s with %d in-flight messages from I/O thread %d: counted as lost",
                worker, lost_reason, lost, self.index,
            )  # fmt: skip
        for conn in self.conns.values():
            if conn.worker == worker:
                conn.in_flight = 0
                conn.worker = -1

    def add_channel(self, worker: int, sock: socket.socket) -> None:
        """Inbox job: a (re)started worker's channel; parked messages go to it."""
        old = self.channels[worker]
        if old is not None:
            self._drop_channel(old, lost_reason="worker replaced")
        sock.setblocking(False)
        channel = WorkerChannel(worker, sock)
        self.channels[worker] = channel
        self.outstanding[worker] = 0
        self.selector.register(sock, READ, (_CHANNEL, channel))
        parked, self._parked = self._parked, []
        for conn_id, records in parked:
            conn = self.conns.get(conn_id)
            if conn is None:
                self.counters["lost_messages"] += len(records)
                continue
            channel.out.extend(records)
            conn.worker = worker
            self.outstanding[worker] += len(records)
            channel.sent_at.append((self._now, len(records)))
        if channel.out:
            self._dirty_channels.add(channel)

    def _done(self, conn_id: int, count: int) -> None:
        conn = self.conns.get(conn_id)
        if conn is not None:
            conn.in_flight = max(0, conn.in_flight - count)
            if conn.state is ConnState.CLOSING and not conn.in_flight and not conn.out_chunks:
                self._close(conn, "closed after its last answer", WriteResult.CONNECTION_GONE)
            return
        owner = self.hub.owner(conn_id)
        if owner is not None and owner is not self:
            owner.post("_done", conn_id, count)

    # -- write jobs ----------------------------------------------------------------------------

    def _write_job(self, worker: int, record: WriteRecord) -> None:
        prompt = bool(record.flags & FLAG_PROMPT_OUTCOME)
        trace = None  # the job's sip.write span, open until its outcome
        if record.trace_context and self._tracing is not None:
            trace = self._tracing.start_write(record.trace_context)
        if record.conn_id:
            self._write_to(record.conn_id, record.job_id, worker, record.payload, prompt, trace)
            return
        if trace is not None:
            trace.transport = record.transport
            trace.remote = (record.host, record.port)
        try:
            host = str(ipaddress.ip_address(record.host))
        except ValueError:
            reason = f"host {record.host!r} is not an IP address"
            self._outcome(worker, record.job_id, 0, WriteResult.BAD_DESTINATION, reason, trace=trace)
            return
        if not 0 < record.port < 65536:
            reason = f"port {record.port} is out of range"
            self._outcome(worker, record.job_id, 0, WriteResult.BAD_DESTINATION, reason, trace=trace)
            return
        key = (record.transport, host, record.port)
        conn_id = self.hub.destination(key)
        if conn_id is None:
            self._connect(key, record.server_name, record.job_id, worker, record.payload, prompt, trace)
        else:
            self._write_to(conn_id, record.job_id, worker, record.payload, prompt, trace)

    def _write_to(
        self, conn_id: int, job_id: int, worker: int, payload: bytes, prompt: bool, trace: WriteTrace | None = None
    ) -> None:
        conn = self.conns.get(conn_id)
        if conn is None:
            owner = self.hub.owner(conn_id)
            if owner is not None and owner is not self:
                owner.post("_write_to", conn_id, job_id, worker, payload, prompt, trace)
            else:
                reason = f"connection {conn_id} is closed"
                self._outcome(worker, job_id, conn_id, WriteResult.CONNECTION_GONE, reason, trace=trace)
            return
        self._enqueue(conn, payload, job_id, worker, prompt, trace)

    def _enqueue(
        self,
        conn: Connection,
        payload: bytes,
        job_id: int,
        worker: int,
        prompt: bool = True,
        trace: WriteTrace | None = None,
    ) -> None:
        """Queue bytes on a connection owned here; ``job_id`` 0 is the transport's own write."""
        if trace is not None:
            trace.transport = conn.transport
            trace.local = conn.local
            trace.remote = conn.remote
        if conn.state is ConnState.CLOSED:
            reason = f"connection {conn.id} is closing"
            self._outcome(worker, job_id, conn.id, WriteResult.CONNECTION_GONE, reason, trace=trace)
            return
        size = len(payload)
        limit = self.settings.write_queue_bytes
        if job_id and conn.pending_bytes + size > limit:
            reason = f"connection {conn.id} has {conn.pending_bytes} bytes queued; limit {limit}"
            self.ratelog.log(logging.WARNING, "queue_full", "write job refused: %s", reason)
            self._outcome(worker, job_id, conn.id, WriteResult.QUEUE_FULL, reason, trace=trace)
            return
        global_limit = self.settings.global_write_queue_bytes
        if job_id and self.hub.pending_write_bytes() + size > global_limit:
            reason = f"{global_limit} bytes queued over all connections"
            self.ratelog.log(logging.WARNING, "global_queue_full", "write job refused: %s", reason)
            self._outcome(worker, job_id, conn.id, WriteResult.LIMIT_REACHED, reason, trace=trace)
            return
        conn.out_chunks.append(payload)
        conn.queued_total += size
        self.pending_write_bytes += size
        if job_id:
            conn.messages_out += 1
            conn.jobs.append(PendingJob(job_id, worker, conn.queued_total, prompt, trace, self._now))
        if conn.state is ConnState.OPEN or conn.state is ConnState.CLOSING:
            self._dirty_conns[conn.id] = conn

    def _flush(self, conn: Connection) -> None:
        if conn.state is not ConnState.OPEN and conn.state is not ConnState.CLOSING:
            return
        chunks = conn.out_chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            try:
                sent = conn.stream.send(data)
            except StreamError as error:
                self._close(conn, error.reason, error.result)
                return
            conn.sent_total += sent
            conn.bytes_out += sent
            self.pending_write_bytes -= sent
            conn.out_chunks = [data[sent:]] if sent < len(data) else []
            if sent:
                conn.last_activity = self._now
            if not conn.out_chunks:
                conn.write_progress = 0.0
            elif sent or not conn.write_progress:
                conn.write_progress = self._now
            jobs = conn.jobs
            while jobs and jobs[0].end <= conn.sent_total:
                job = jobs.popleft()
                self._write_done(job.queued_at)
                self._outcome(job.worker, job.job_id, conn.id, WriteResult.SENT, "", job.prompt, job.trace)
        if not conn.out_chunks and conn.state is ConnState.CLOSING and not conn.in_flight:
            self._close(conn, "closed after flush", WriteResult.CONNECTION_GONE)
            return
        self._update_events(conn)

    def _writable(self, conn: Connection) -> None:
        if conn.state is ConnState.CONNECTING:
            self._connected(conn)
            return
        if conn.stream.wants & WRITE:  # a TLS read was waiting to write: retry it
            self._read(conn)
        self._flush(conn)

    def _outcome(
        self,
        worker: int,
        job_id: int,
        conn_id: int,
        result: WriteResult,
        reason: str,
        prompt: bool = True,
        trace: WriteTrace | None = None,
    ) -> None:
        """Report a job's outcome to its worker; a ``sent`` nobody waits for rides with later records.

        A traced job's ``sip.write`` span ends here, with ``error.type`` the outcome's label on failure.
        """
        self.counters[f"write.{result.label}"] += 1
        if trace is not None and self._tracing is not None:
            self._tracing.end_write(trace, conn_id, "" if result is WriteResult.SENT else result.label, reason)
        if not job_id or worker < 0:
            return
        channel = self.channels[worker]
        if channel is None:
            return  # that worker died; its callbacks died with it
        channel.out.append(encode_outcome(job_id, conn_id, result, reason))
        if prompt or result is not WriteResult.SENT:
            self._dirty_channels.add(channel)
        else:
            self._lazy_channels.add(channel)

    # -- connections: accept, connect, move, close ---------------------------------------------

    def add_listener(self, listener: socket.socket, transport: str) -> None:
        """Inbox job for thread 0: start accepting ``transport`` connections on ``listener``."""
        self._listeners.append(listener)
        self.selector.register(listener, READ, (_LISTENER, (listener, transport)))

    def _accept(self, listener: socket.socket, transport: str) -> None:
        hub = self.hub
        limit = self.settings.max_connections
        local = listener.getsockname()[:2]
        wildcard = local[0] in ("0.0.0.0", "::")
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                self.counters[f"accept_failed.{errno.errorcode.get(error.errno or 0, 'other')}"] += 1
                self.ratelog.log(logging.ERROR, "accept", "accept failed: %s", error)
                return
            if hub.connection_count() >= limit:
                sock.close()
                self.counters["refused.max_connections"] += 1
                self.ratelog.log(
                    logging.WARNING,
                    "max_connections",
                    "refused %s:%d: max_connections %d reached",
                    address[0],
                    address[1],
                    limit,
                )
                continue
            self.counters[f"accepted.{transport}"] += 1
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn_local = sock.getsockname()[:2] if wildcard else local
            if transport == "tls" and self._tls is not None:
                stream: TcpStream | TlsStream = TlsStream(sock, self._tls.server, server_side=True)
            else:
                stream = TcpStream(sock)
            conn = Connection(
                hub.new_connection_id(), sock, stream, transport, conn_local, address[:2], self.limits, self._now
            )
            if transport == "tls":
                conn.deadline = self._now + self.settings.tls_handshake_timeout
                if self._tracing is not None:
                    conn.trace = self._tracing.start_connection(SPAN_HANDSHAKE, None)
            target = hub.least_loaded_thread()
            hub.owners[conn.id] = target
            if target is self:
                self.adopt(conn, True)
            else:
                target.post("adopt", conn, True)

    def adopt(self, conn: Connection, accepted: bool = False) -> None:
        """Inbox job: take ownership of a new or moved connection, buffers and jobs included.

        A just-accepted connection is read at once: clients send right after
        connecting, so its first bytes (request or ClientHello) are usually
        there already, and this saves a selector round trip.
        """
        if conn.state is ConnState.CLOSED:
            return
        self.conns[conn.id] = conn
        self.hub.owners[conn.id] = self
        self.pending_write_bytes += conn.pending_bytes
        if conn.out_chunks and (conn.state is ConnState.OPEN or conn.state is ConnState.CLOSING):
            self._dirty_conns[conn.id] = conn
        self._update_events(conn)
        if accepted:
            if conn.state is ConnState.HANDSHAKE:
                self._handshake(conn)
            else:
                self._read(conn)

    def _connect(
        self,
        key: DestinationKey,
        server_name: str,
        job_id: int,
        worker: int,
        payload: bytes,
        prompt: bool,
        trace: WriteTrace | None = None,
    ) -> None:
        transport, host, port = key
        if transport == "tls" and self._tls is None:
            reason = "TLS is not enabled on this transport"
            self._outcome(worker, job_id, 0, WriteResult.BAD_DESTINATION, reason, trace=trace)
            return
        if self.hub.connection_count() >= self.settings.max_connections:
            reason = f"max_connections {self.settings.max_connections} reached"
            self._outcome(worker, job_id, 0, WriteResult.LIMIT_REACHED, reason, trace=trace)
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as error:  # out of file descriptors: fail this job, keep the thread
            self.counters["connect_failed.socket"] += 1
            self.ratelog.log(logging.ERROR, "socket", "cannot open a socket for %s:%d: %s", host, port, error)
            self._outcome(worker, job_id, 0, WriteResult.LIMIT_REACHED, f"cannot open a socket: {error}", trace=trace)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The tcp.connect span: child of the job's write span, or a root of its own.
        connect_trace = self._tracing.start_connection(SPAN_CONNECT, trace) if self._tracing is not None else None
        status = sock.connect_ex((host, port))
        if status not in (0, errno.EINPROGRESS):
            sock.close()
            result = ERRNO_RESULTS.get(status, WriteResult.UNREACHABLE)
            self.counters[f"connect_failed.{result.label}"] += 1
            reason = f"connect to {host}:{port} failed: {os.strerror(status)}"
            if connect_trace is not None and self._tracing is not None:
                self._tracing.end_unconnected(connect_trace, transport, (host, port), result.label, reason)
            self._outcome(worker, job_id, 0, result, reason, trace=trace)
            return
        unbound = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        stream: TcpStream | TlsStream = TcpStream(sock)
        if transport == "tls" and self._tls is not None:
            stream = TlsStream(sock, self._tls.client, server_side=False, server_name=server_name or host)
            if (host, port) in self.settings.insecure_destinations:
                stream.skip_verification()
                self.ratelog.log(
                    logging.WARNING, f"insecure.{host}:{port}",
                    "TLS to %s:%d without certificate verification (tls_insecure_destinations)", host, port,
                )  # fmt: skip
        conn = Connection(
            self.hub.new_connection_id(), sock, stream, transport, unbound, (host, port), self.limits, self._now,
            outbound=True, destination=key,
        )  # fmt: skip
        conn.deadline = self._now + self.settings.connect_timeout
        winner = self.hub.claim_destination(key, conn.id)
        if winner != conn.id:  # another thread opened one first: use it
            sock.close()
            self._write_to(winner, job_id, worker, payload, prompt, trace)
            return
        conn.trace = connect_trace
        self.counters["connects"] += 1
        self.adopt(conn)
        self._enqueue(conn, payload, job_id, worker, prompt, trace)

    def _connected(self, conn: Connection) -> None:
        status = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if status:
            result = ERRNO_RESULTS.get(status, WriteResult.UNREACHABLE)
            self.counters[f"connect_failed.{result.label}"] += 1
            remote = f"{conn.remote[0]}:{conn.remote[1]}"
            self._close(conn, f"connect to {remote} failed: {os.strerror(status)}", result)
            return
        conn.set_address(conn.sock.getsockname()[:2])
        conn.last_activity = self._now
        if conn.trace is not None and self._tracing is not None:
            self._tracing.end_connection(conn.trace, conn, "", "")
            tls = isinstance(conn.stream, TlsStream)
            conn.trace = self._tracing.next_phase(conn.trace, SPAN_HANDSHAKE) if tls else None
        if isinstance(conn.stream, TlsStream):
            conn.transition(ConnState.HANDSHAKE)
            conn.deadline = self._now + self.settings.tls_handshake_timeout
            conn.stream.handshake_started = self._now
            self._handshake(conn)
            return
        conn.transition(ConnState.OPEN)
        self._flush(conn)

    def _handshake(self, conn: Connection) -> None:
        """Advance a TLS handshake; on success the connection opens and flushes what waited."""
        stream = conn.stream
        assert isinstance(stream, TlsStream)
        try:
            if stream.handshake():
                self._update_events(conn)
                return
            if conn.outbound and stream.verify_peer:
                verify_server_name(stream.ssl, stream.server_name)
        except StreamError as error:
            self._tls_failed(conn, error.reason, error.result, error.reason)
            return
        except TlsVerifyError as error:
            self._tls_failed(conn, "name_mismatch", WriteResult.TLS_FAILED, str(error))
            return
        elapsed_ms = (time.monotonic() - stream.handshake_started) * 1000.0
        info = connection_info(stream.ssl, round(elapsed_ms, 3))
        conn.set_tls(info)
        if conn.trace is not None:
            self._end_connection_span(conn, "", "")
        if self._recorder is not None and self._recorder.metrics:
            self._recorder.handshake(elapsed_ms / 1000.0, info.version, "")
        conn.transition(ConnState.OPEN)
        conn.last_activity = self._now
        self.counters["tls_handshakes"] += 1
        self._handshake_buckets[bisect.bisect_left(HANDSHAKE_BUCKETS_MS, elapsed_ms)] += 1
        if conn.out_chunks:
            self._dirty_conns[conn.id] = conn
        self._update_events(conn)
        self._read(conn)  # the peer's first message may already sit decrypted in OpenSSL

    def _tls_failed(self, conn: Connection, reason: str, result: WriteResult, detail: str) -> None:
        self.counters[f"tls_handshake_failed.{reason}"] += 1
        if conn.trace is not None:
            self._end_connection_span(conn, reason, detail)
        if self._recorder is not None and self._recorder.metrics and isinstance(conn.stream, TlsStream):
            self._recorder.handshake(time.monotonic() - conn.stream.handshake_started, "", reason)
        self.ratelog.log(
            logging.WARNING, f"tls.{reason}", "TLS handshake with %s:%d failed: %s",
            conn.remote[0], conn.remote[1], detail,
        )  # fmt: skip
        self._close(conn, f"TLS handshake failed: {detail}", result)

    def _end_connection_span(self, conn: Connection, error: str, detail: str) -> None:
        """End the connect or handshake span open on ``conn`` (``error``: its error.type, "" when it worked)."""
        if conn.trace is not None and self._tracing is not None:
            self._tracing.end_connection(conn.trace, conn, error, detail)
        conn.trace = None

    def _update_events(self, conn: Connection) -> None:
        """Register exactly the selector events the connection's state and stream need."""
        state = conn.state
        if state is ConnState.OPEN:
            events = (0 if self._shutdown_deadline else READ) | (WRITE if conn.out_chunks else 0)
        elif state is ConnState.CLOSING:
            events = WRITE if conn.out_chunks else 0
        elif state is ConnState.CONNECTING:
            events = WRITE
        elif state is ConnState.HANDSHAKE:
            events = 0
        else:
            return
        self._set_events(conn, events | conn.stream.wants)

    def _set_events(self, conn: Connection, events: int) -> None:
        current = conn.registered_events
        if events == current:
            return
        if not events:
            self.selector.unregister(conn.sock)
        elif not current:
            self.selector.register(conn.sock, events, (_CONN, conn))
        else:
            self.selector.modify(conn.sock, events, (_CONN, conn))
        conn.registered_events = events

    def _release(self, conn: Connection) -> None:
        """Stop owning ``conn`` without closing it (it is moving to another thread)."""
        self._set_events(conn, 0)
        del self.conns[conn.id]
        self._dirty_conns.pop(conn.id, None)
        self.pending_write_bytes -= conn.pending_bytes

    def _close_after_flush(self, conn: Connection) -> None:
        """Stop reading; close once queued bytes are out and in-flight messages are answered.

        The wait is bounded by ``shutdown_grace`` (checked on the timer tick).
        """
        if conn.state is ConnState.OPEN:
            conn.transition(ConnState.CLOSING)
            conn.deadline = self._now + self.settings.shutdown_grace
        if conn.out_chunks:
            self._dirty_conns[conn.id] = conn
            self._update_events(conn)
        elif conn.in_flight:
            self._update_events(conn)
        else:
            self._close(conn, "closed", WriteResult.CONNECTION_GONE)

    def _close(self, conn: Connection, reason: str, result: WriteResult) -> None:
        if conn.state is ConnState.CLOSED:
            return
        conn.transition(ConnState.CLOSED)
        self._release(conn)
        if conn.stats_slot >= 0:
            self._free_slot(conn)
        conn.stream.close()
        self.hub.forget(conn.id, conn.destination)
        self.counters["closed"] += 1
        if conn.trace is not None:  # still connecting or in its TLS handshake
            self._end_connection_span(conn, result.label, reason)
        for job in conn.jobs:
            self._write_done(job.queued_at)
            self._outcome(job.worker, job.job_id, conn.id, result, reason, trace=job.trace)
        conn.jobs.clear()
        log.debug("connection %d %s:%d closed: %s", conn.id, conn.remote[0], conn.remote[1], reason)

    # -- timers --------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        self._next_tick = now + TICK_SECONDS
        elapsed = now - self._load_window_start
        if elapsed >= 1.0:
            self._load = min(1.0, self._busy / elapsed)
            self._busy = 0.0
            self._load_window_start = now
        settings = self.settings
        message_timeout = settings.message_timeout
        idle_timeout = settings.idle_timeout
        send_timeout = settings.send_timeout
        for conn in list(self.conns.values()):
            if conn.state is ConnState.CLOSING:
                if now > conn.deadline:
                    self._close(conn, "closing: answers not done in time", WriteResult.CONNECTION_GONE)
            elif conn.state is ConnState.HANDSHAKE:
                if now > conn.deadline:
                    timeout = f"not done within {settings.tls_handshake_timeout}s"
                    self._tls_failed(conn, "timeout", WriteResult.TIMEOUT, timeout)
            elif conn.state is ConnState.CONNECTING:
                if now > conn.deadline:
                    timeout = (
                        f"connect to {conn.remote[0]}:{conn.remote[1]} timed out after {settings.connect_timeout}s"
                    )
                    self.counters["connect_failed.timeout"] += 1
                    self._close(conn, timeout, WriteResult.TIMEOUT)
            elif conn.write_progress and now - conn.write_progress > send_timeout:
                self.counters["closed_send_timeout"] += 1
                self.ratelog.log(
                    logging.WARNING, "send_timeout", "closing connection %d %s:%d: peer read nothing for %.1fs",
                    conn.id, conn.remote[0], conn.remote[1], send_timeout,
                )  # fmt: skip
                self._close(conn, f"peer read nothing for {send_timeout}s", WriteResult.TIMEOUT)
            elif conn.message_started and now - conn.message_started > message_timeout:
                error = FramingError(
                    FramingErrorReason.MESSAGE_TIMEOUT, f"message not complete within {message_timeout}s"
                )
                self._framing_error(conn, error)
            elif not conn.in_flight and not conn.out_chunks and now - conn.last_activity > idle_timeout:
                self.counters["closed_idle"] += 1
                self._close(conn, f"idle for {idle_timeout}s", WriteResult.CONNECTION_GONE)
        if self._lazy_channels:
            self._dirty_channels |= self._lazy_channels
            self._lazy_channels = set()
        if self._retire_deadline and (now > self._retire_deadline or not any(self.outstanding)):
            self._running = False
        if self._shutdown_deadline:
            drained = not any(self.outstanding) and not any(c.out_chunks for c in self.conns.values())
            if drained or now > self._shutdown_deadline:
                self._running = False
        if self._stats is not None:
            try:
                self._write_stats(now)
            except Exception:  # stats must never break traffic: stop publishing from this thread
                log.exception("I/O thread %d: writing the stats block failed; this thread stops publishing", self.index)
                self._stats = None

    # -- stats block (layout and rules: transport/statsblock.py) --------------------------------

    def _write_stats(self, now: float) -> None:
        """This thread's record, and the slots of its connections that changed since last written.

        A connection takes a slot the first time it is written, so one opened and closed
        between two ticks costs nothing; an unchanged one costs a tuple compare.
        """
        stats = self._stats
        assert stats is not None
        if self.stats_record >= 0:
            stats.write_thread(
                self.stats_record, THREAD_RETIRING if self._retire_deadline else THREAD_ACTIVE, self.index,
                len(self.conns), self._load, self._lag * 1000.0, len(self.inbox), sum(self.outstanding), self._jobs,
                self.pending_write_bytes, now, self._started,
            )  # fmt: skip
        index = self.index
        hub = self.hub
        write = stats.write_connection
        for conn in self.conns.values():
            # Everything a slot shows moves with one of these (last_activity with bytes or state).
            mark = (
                conn.state, conn.bytes_in, conn.bytes_out, conn.queued_total, conn.messages_out, conn.in_flight, index
            )  # fmt: skip
            if mark == conn.stats_mark:
                continue
            slot = conn.stats_slot
            if slot < 0:
                slot = hub.alloc_slot(first_try=slot == -1)
                if slot < 0:
                    conn.stats_slot = -2  # counted once; asks again next tick
                    continue
                conn.stats_slot = slot
            write(slot, conn, index)
            conn.stats_mark = mark

    def _free_slot(self, conn: Connection) -> None:
        """Clear a closed connection's slot, then give it back (the next owner writes after us)."""
        slot = conn.stats_slot
        conn.stats_slot = -1
        stats = self.hub.stats
        if stats is not None:
            stats.clear_slot(slot)
        self.hub.free_slot(slot)

    def _write_done(self, queued_at: float) -> None:
        """Write-job latency: from the owning thread queueing the job to its outcome."""
        elapsed_ms = (time.monotonic() - queued_at) * 1000.0
        self._write_buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, elapsed_ms)] += 1
        self._write_ms += elapsed_ms

    def stats_totals(self) -> ThreadTotals:
        """Cross-thread read for the supervisor: copies made under the GIL (each one atomic), no lock."""
        return ThreadTotals(
            dict(self.counters), list(self._handshake_buckets), list(self._dispatch_buckets), self._dispatch_ms,
            list(self._write_buckets), self._write_ms, list(self.done_by_worker), list(self.outstanding),
            len(self.inbox),
        )  # fmt: skip

    # -- control jobs (posted by the supervisor) -----------------------------------------------

    def retire(self, targets: tuple[IOThread, ...], grace: float) -> None:
        """Inbox job: hand every connection to ``targets``, then drain and stop."""
        for conn_id, records in self._parked:
            self.counters["lost_messages"] += len(records)
            log.error(
                "I/O thread %d retiring: %d parked messages of connection %d lost", self.index, len(records), conn_id
            )
            conn = self.conns.get(conn_id)
            if conn is not None:  # they will never be answered: do not let them hold the connection
                conn.in_flight = max(0, conn.in_flight - len(records))
        for conn in list(self.conns.values()):
            target = min(targets, key=IOThread.load_hint)
            self._release(conn)
            self.hub.owners[conn.id] = target
            target.post("adopt", conn)
        self._parked = []
        self._retire_deadline = self._now + grace
        self._next_tick = self._now  # check at once whether anything is outstanding

    def shutdown(self, grace: float) -> None:
        """Inbox job: stop accepting and reading, finish in-flight work for up to ``grace`` s."""
        for listener in self._listeners:
            self.selector.unregister(listener)
            listener.close()
        self._listeners = []
        self._shutdown_deadline = self._now + grace
        for conn in list(self.conns.values()):
            self._update_events(conn)
        self._next_tick = self._now

    def snapshot(self, future: Future[tuple[ThreadStatistics, list[ConnectionInfo]]], with_connections: bool) -> None:
        """Inbox job: statistics and (optionally) connection snapshots, answered through ``future``."""
        stats = ThreadStatistics(
            index=self.index,
            connections=len(self.conns),
            load=round(self._load, 4),
            queue_depth=len(self.inbox),
            jobs=self._jobs,
            loop_lag_ms=round(self._lag * 1000, 3),
            pending_write_bytes=self.pending_write_bytes,
            outstanding=tuple(self.outstanding),
            counters=dict(self.counters),
            handshake_buckets=tuple(self._handshake_buckets),
        )
        now = self._now
        infos = [conn.info(self.index, now) for conn in self.conns.values()] if with_connections else []
        future.set_result((stats, infos))

    def close_connection(self, conn_id: int, future: Future[bool]) -> None:
        """Inbox job: close one connection by id (operator action)."""
        conn = self.conns.get(conn_id)
        if conn is not None:
            log.info("closing connection %d %s:%d on operator request", conn.id, conn.remote[0], conn.remote[1])
            self.counters["closed_by_operator"] += 1
            self._close(conn, "closed by operator", WriteResult.CONNECTION_GONE)
            future.set_result(True)
            return
        owner = self.hub.owner(conn_id)
        if owner is not None and owner is not self:
            owner.post("close_connection", conn_id, future)
        else:
            future.set_result(False)
