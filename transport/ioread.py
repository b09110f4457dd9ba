"""Reading an I/O thread's connections: framing, and dispatch of the messages to workers.

One ``recv`` per readable connection; the sans-IO framer returns every complete
message in those bytes (keep-alive pings are answered here). All messages of one
read become MESSAGE records for one worker, appended to its channel buffer and
sent once at the end of the loop pass: the worker still holding this
connection's earlier messages, so they are processed in order, else the worker
with the least outstanding work. While no worker is alive, messages are parked
(``iochannel.py`` hands them to the next channel); above the worker's backlog
cap they are answered 503; a framing error is answered and closes the
connection once its answers are out.

This is the per-message hot path: it must not gain calls or attribute hops.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from sipwire.otel.recorder import traceparent
from sipwire.transport.connection import Connection
from sipwire.transport.framing import PONG, Event, FramingError, FramingErrorReason, Ping
from sipwire.transport.iowrite import WriteLayer
from sipwire.transport.outcome import WriteResult
from sipwire.transport.sip import response_for_unparsable
from sipwire.transport.streams import StreamError
from sipwire.transport.wire import encode_message

_FRAMING_ANSWERS: Final = {
    FramingErrorReason.MESSAGE_TOO_LARGE: (413, "Request Entity Too Large"),
    FramingErrorReason.HEADERS_TOO_LARGE: (513, "Message Too Large"),
}


class ReadLayer(WriteLayer):
    """Read, framing and dispatch of an I/O thread; see the module docstring."""

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
