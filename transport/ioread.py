"""Reading an I/O thread's connections: framing, and dispatch of the messages to workers.

One ``recv`` per readable connection; the sans-IO framer returns every complete
message in those bytes (keep-alive pings are answered here). All messages of one
read become MESSAGE records for one worker, appended to its channel buffer and
sent once at the end of the loop pass: the worker still holding this
connection's earlier messages, so they are processed in order, else the worker
with the least outstanding work. A connection has at most
``max_in_flight_per_connection`` messages at the workers; the rest of a read
waits in the connection (``held``), which is not read meanwhile, so flooding
peers take turns with everyone else. On WS and WSS connections the WebSocket layer
(``transport/wsframing.py``) stands in for the framer and returns the same events,
plus the bytes it sends by itself (``iows.py`` acts on them). While no worker is alive, messages are parked
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
from sipwire.transport.framing import PING_EVENT, PONG, Event, FramingError, FramingErrorReason, Ping
from sipwire.transport.iows import WebSocketLayer
from sipwire.transport.outcome import WriteResult
from sipwire.transport.sipresponse import response_for_unparsable
from sipwire.transport.streams import StreamError
from sipwire.transport.wire import encode_message
from sipwire.transport.wsframing import WebSocketClosedError

#: How many times max_in_flight_per_connection a connection may have at the workers when it is the only
#: one with messages there: whole batches keep a busy trunk fast, and a newcomer still finds a bounded
#: queue ahead of it.
SOLE_CONNECTION_FACTOR: Final = 8

#: What a 503 for a peer over its request rate tells it: try again after this many seconds (its bucket refills).
RETRY_AFTER: Final = (("Retry-After", "1"),)

_FRAMING_ANSWERS: Final = {
    FramingErrorReason.MESSAGE_TOO_LARGE: (413, "Request Entity Too Large"),
    FramingErrorReason.HEADERS_TOO_LARGE: (513, "Message Too Large"),
}


class ReadLayer(WebSocketLayer):
    """Read, framing and dispatch of an I/O thread; see the module docstring."""

    def _read(self, conn: Connection) -> None:
        stream = conn.stream
        read_at = time.time()  # a sip.receive span starts at its read, and so does the read_framed stage
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
                self._dispatch(conn, error.events, read_at)
            self._framing_error(conn, error)
            return
        except WebSocketClosedError as error:  # WS, WSS: its last frame or refusal is among the events
            self._dispatch(conn, error.events, read_at)
            self._ws_closed(conn, error)
            return
        if events:
            self._dispatch(conn, events, read_at)
        if framer.buffered_bytes and framer.in_message:
            if events or not conn.message_started:
                conn.message_started = self._now  # completed events consumed the old partial: a new one began
        else:
            conn.message_started = 0.0

    def _dispatch(self, conn: Connection, events: list[Event], read_at: float) -> None:
        received_at = time.time()
        records: list[bytes] = []
        messages: list[bytes] = []  # the raw messages of ``records``, to answer 503 from
        prefix = conn.prefix
        tracing = self._tracing
        traced: list[tuple[int, int]] = []  # (trace id, span id) of the sampled messages
        for event in events:
            if isinstance(event, Ping):
                if event is PING_EVENT:
                    self.counters["keepalive_pings"] += 1
                    self._enqueue(conn, PONG, 0, -1)  # over a WebSocket, a message of its own
                else:
                    self._ws_control(conn, event)
                continue
            messages.append(event)
            if tracing is None:
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
        if self._capture is not None:
            self._capture.received(records)
        count = len(records)
        self._read_framed.observe(max(received_at - read_at, 0.0) * 1000.0, count)
        conn.messages_in += count
        self.counters["messages_in"] += count
        source = conn.source
        if source is not None and (allowed := source.requests.take(count, self._now)) < count:
            self._reject_over_rate(conn, messages[allowed:])
            records, messages, count = records[:allowed], messages[:allowed], allowed
            if not records:
                if traced:
                    self._received(conn, traced, read_at, "rate_limited")
                return
        room = self._in_flight_limit(conn) - conn.in_flight
        if conn.held or room < count:
            # Fairness: past its in-flight bound a connection's messages wait here, in arrival order,
            # and it is not read until workers answer (see IOState._update_events).
            take = 0 if conn.held else max(room, 0)
            conn.held.extend(zip(records[take:], messages[take:], strict=True))
            self.counters["held_messages"] += count - take
            records, messages = records[:take], messages[:take]
            self._update_events(conn)
        error = self._to_workers(conn, records, messages) if records else ""
        if traced:
            self._received(conn, traced, read_at, error)

    def _to_workers(self, conn: Connection, records: list[bytes], messages: list[bytes]) -> str:
        """Give one connection's messages to one worker; the error of their receive spans ("" or "overload").

        The worker that holds this connection's earlier messages gets them (or they are parked behind
        them while no worker is alive), so a connection's messages are processed in arrival order.
        """
        worker = conn.worker
        if not conn.in_flight or (worker >= 0 and self.channels[worker] is None):
            worker = self._least_busy_worker()
        if worker < 0:
            self._park(conn, records)
            return ""
        channel = self.channels[worker]
        assert channel is not None
        if channel.backlog_bytes > self.settings.dispatch_backlog_bytes:
            self._reject_overload(conn, messages)
            return "overload"
        count = len(records)
        channel.out.extend(records)
        self._dirty_channels.add(channel)
        conn.worker = worker
        conn.in_flight += count
        self.outstanding[worker] += count
        channel.sent_at.append((time.monotonic(), count))
        return ""

    def _release_held(self, conn: Connection) -> None:
        """Messages that waited for room go to a worker, oldest first; reading resumes once none wait."""
        held = conn.held
        room = self._in_flight_limit(conn) - conn.in_flight
        if room <= 0:
            return
        records: list[bytes] = []
        messages: list[bytes] = []
        while held and room:
            record, message = held.popleft()
            records.append(record)
            messages.append(message)
            room -= 1
        self._to_workers(conn, records, messages)
        if not held:
            self._update_events(conn)

    def _in_flight_limit(self, conn: Connection) -> int:
        """``max_in_flight_per_connection``, or SOLE_CONNECTION_FACTOR times it while no other connection
        of this thread has messages at the workers (no one to take turns with: bigger batches)."""
        if sum(self.outstanding) > conn.in_flight:
            return self._max_in_flight
        return self._max_in_flight * SOLE_CONNECTION_FACTOR

    def _received(self, conn: Connection, traced: list[tuple[int, int]], read_at: float, error: str) -> None:
        """Record the ``sip.receive`` spans of the sampled messages of one read."""
        tracing = self._tracing
        assert tracing is not None
        end_ns = time.time_ns()
        start_ns = min(int(read_at * 1e9), end_ns)
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

    def _reject_overload(self, conn: Connection, messages: list[bytes]) -> None:
        for message in messages:
            answer = response_for_unparsable(message, 503, "Service Unavailable (worker backlog full)")
            self.counters["overload_rejected"] += 1
            if answer is not None:
                self._enqueue(conn, answer, 0, -1)
        self.ratelog.log(
            logging.WARNING,
            "overload",
            "worker backlog above %d bytes: answering 503",
            self.settings.dispatch_backlog_bytes,
        )

    def _reject_over_rate(self, conn: Connection, messages: list[bytes]) -> None:
        """Messages past the peer address's requests_per_ip: answered 503 with Retry-After, never routed."""
        self.counters["limited.request_rate"] += len(messages)
        for message in messages:
            answer = response_for_unparsable(message, 503, "Service Unavailable (rate limit)", RETRY_AFTER)
            if answer is not None:
                self._enqueue(conn, answer, 0, -1)
        self.ratelog.log(
            logging.WARNING, "request_rate", "%s sends more than requests_per_ip %d/s: answering 503",
            conn.remote[0], self.settings.requests_per_ip,
        )  # fmt: skip

    def _framing_error(self, conn: Connection, error: FramingError) -> None:
        self.counters[f"framing_error.{error.reason.value}"] += 1
        self.ratelog.log(
            logging.WARNING, f"framing.{error.reason.value}",
            "closing connection %d from %s:%d: %s", conn.id, conn.remote[0], conn.remote[1], error,
        )  # fmt: skip
        if conn.ws is not None:  # only the message timeout reaches a WebSocket: close it as policy (1008)
            self._ws_fail(conn, 1008, str(error))
            return
        status, reason = _FRAMING_ANSWERS.get(error.reason, (400, "Bad Request"))
        answer = response_for_unparsable(error.header_block, status, f"{reason} ({error.reason.value})")
        if answer is not None:
            self._enqueue(conn, answer, 0, -1)
        self._close_after_flush(conn)
