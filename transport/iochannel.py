"""An I/O thread's worker channels: batches of messages out, write jobs and done counts in.

A channel (:class:`~sipwire.transport.iostate.WorkerChannel`) is this thread's
end of a socketpair with one worker; ``transport/workerpool.py`` posts it here
with ``add_channel``. Messages leave in one ``send`` per channel per loop pass;
bytes the kernel does not take wait in the channel's backlog, whose size is the
overload signal ``ioread.py`` checks. From the worker come WRITE records (a
write job: queued on its connection, forwarded to the connection's owner, or a
connect started), DONE counts, which release a connection's in-flight
messages and measure dispatch latency, the workers' STAGES histograms, AUTH_FAILED
records, which charge the peer's address (``transport/sources.py``), and SPANS records
(the worker's trace spans), which go undecoded to the transport's telemetry queue. A channel that closes (its worker
exited) counts its in-flight messages as lost; a restarted worker's channel
takes the messages parked in the meantime.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time

from sipwire.otel import logs
from sipwire.transport.connection import ConnState
from sipwire.transport.ioconnect import ConnectLayer
from sipwire.transport.iostate import KIND_CHANNEL, WorkerChannel
from sipwire.transport.outcome import WriteResult
from sipwire.transport.poller import READ, WRITE
from sipwire.transport.stages import StagesRecord
from sipwire.transport.wire import (
    FLAG_NO_OUTCOME,
    FLAG_PROMPT_OUTCOME,
    AuthFailedRecord,
    CloseRecord,
    CountRecord,
    DoneRecord,
    SpansRecord,
    WireError,
    WriteRecord,
    encode_connections_closed,
)

log = logging.getLogger("sipwire.transport")


class ChannelLayer(ConnectLayer):
    """Worker channels of an I/O thread; see the module docstring."""

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
            log.error(
                "I/O thread %d: corrupt channel from worker %d: %s; the worker is restarted",
                self.index, channel.worker, error,
            )  # fmt: skip
            self.counters["worker_channel_broken"] += 1
            self._drop_channel(channel, lost_reason="corrupt channel")
            self.hub.restart_worker(channel.worker)  # a new worker gets new channels to every thread
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
            elif type(record) is CloseRecord:
                self._close_requested(record.conn_id)
            elif type(record) is StagesRecord:
                for histogram, (counts, sum_ms) in zip(self._worker_stages, record.stages, strict=True):
                    histogram.add(counts, sum_ms)
            elif type(record) is AuthFailedRecord:
                self._auth_failed(record.conn_id)
            elif type(record) is SpansRecord:
                self._forward_spans(worker, record)
        if self._tracing is not None:
            logs.leave()  # a traced write job above named its span in this thread's log lines
        if finished:
            self._dispatch_done(channel, finished)

    def _forward_spans(self, worker: int, record: SpansRecord) -> None:
        """A worker's spans: to the one exporter, through the telemetry thread (bounded, drops counted)."""
        if self._tracing is None:
            self.counters["telemetry.dropped_tracing_off"] += record.spans
            return
        self._tracing.forward(worker, record.pid, record.spans, record.payload)

    def _close_requested(self, conn_id: int) -> None:
        """A worker's CLOSE: the connection closes once what is queued for it is sent (its owner does it)."""
        conn = self.conns.get(conn_id)
        if conn is not None:
            self._close_after_flush(conn)
            return
        owner = self.hub.owner(conn_id)
        if owner is not None and owner is not self:
            owner.post("_close_requested", conn_id)

    def _auth_failed(self, conn_id: int) -> None:
        """A worker's AUTH_FAILED: charge the peer's address; over its limit, close this connection after the answer.

        Connections of allow-listed peers (and outbound ones) have no source and are never charged.
        """
        conn = self.conns.get(conn_id)
        if conn is None:
            owner = self.hub.owner(conn_id)
            if owner is not None and owner is not self:
                owner.post("_auth_failed", conn_id)
            return
        if conn.source is None or not self.hub.sources.auth_failed(conn.source):
            return
        self.counters["limited.auth_failures"] += 1
        self.ratelog.log(
            logging.WARNING, "limited.auth_failures",
            "%s is blocked for %g s: %d failed authentications within that time; connection %d closed",
            conn.remote[0], self.settings.auth_failure_window, self.settings.auth_failures_per_ip, conn.id,
        )  # fmt: skip
        self._close_after_flush(conn)

    def _write_job(self, worker: int, record: WriteRecord) -> None:
        """A WRITE record: to its connection by id, or to a destination (an open connection or a new one)."""
        prompt = bool(record.flags & FLAG_PROMPT_OUTCOME)
        if record.flags & FLAG_NO_OUTCOME:
            worker = -1  # outcomes go to the job's worker: to none (see IOThread._outcome)
        trace = None  # the job's sip.write span, open until its outcome
        if record.trace_context and self._tracing is not None:
            trace = self._tracing.start_write(record.trace_context)
            if trace is not None:
                logs.enter(trace.trace_id, trace.span_id)
        elif self._tracing is not None:
            logs.leave()  # an untraced job after a traced one in the same read
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

    def _announce_closed(self) -> None:
        """One CONNECTIONS_CLOSED record to every live worker for the connections closed this pass.

        A worker that is down misses it; bindings on those connections then last until they expire
        (and a request sent to one fails with connection_gone, which removes it too).
        """
        records = encode_connections_closed(self._closed_ids)
        self._closed_ids = []
        for channel in self.channels:
            if channel is not None:
                channel.out.append(records)
                self._dirty_channels.add(channel)

    def _dispatch_done(self, channel: WorkerChannel, finished: int) -> None:
        """Dispatch latency of ``finished`` messages: the oldest ones sent on ``channel``."""
        self.done_by_worker[channel.worker] += finished
        now = time.monotonic()
        sent_at = channel.sent_at
        histogram = self._dispatch_latency
        while finished and sent_at:
            sent, count = sent_at[0]
            taken = min(count, finished)
            if taken == count:
                sent_at.popleft()
            else:
                sent_at[0] = (sent, count - taken)
            histogram.observe((now - sent) * 1000.0, taken)
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
            self.selector.modify(channel.sock, events, (KIND_CHANNEL, channel))

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
                if conn.held:
                    self._release_held(conn)

    def add_channel(self, worker: int, sock: socket.socket) -> None:
        """Inbox job: a (re)started worker's channel; parked messages go to it."""
        old = self.channels[worker]
        if old is not None:
            self._drop_channel(old, lost_reason="worker replaced")
        sock.setblocking(False)
        channel = WorkerChannel(worker, sock)
        self.channels[worker] = channel
        self.outstanding[worker] = 0
        self.selector.register(sock, READ, (KIND_CHANNEL, channel))
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
            if conn.held:
                self._release_held(conn)
            if conn.state is ConnState.CLOSING and not conn.in_flight and not conn.out_chunks:
                self._close(conn, "closed after its last answer", WriteResult.CONNECTION_GONE)
            return
        owner = self.hub.owner(conn_id)
        if owner is not None and owner is not self:
            owner.post("_done", conn_id, count)
