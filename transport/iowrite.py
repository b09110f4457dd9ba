"""Write queues of an I/O thread's connections, the outcome of every write job, and close.

A write job (a worker's WRITE record; job id 0 is the transport's own answer,
such as a 503 or a keep-alive pong) is queued on its connection (on a WS or WSS
connection, wrapped in one WebSocket message first) within two
caps: per connection (``write_queue_bytes``) and over all connections
(``global_write_queue_bytes``). A connection with queued bytes is flushed once
at the end of the loop pass: one ``send`` of its leading chunks joined (up to
:data:`FLUSH_JOIN_BYTES`). Every job gets
one outcome record back to its worker: ``sent`` once its last byte is in the
kernel (riding with later records unless the worker wants it promptly), or why
it failed. Closing a connection lives here because that is mostly what a close
does: answer the connection's remaining jobs with the close's result.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Final

from sipwire.otel.recorder import WriteTrace
from sipwire.transport.connection import Connection, ConnState, PendingJob
from sipwire.transport.framing import PONG
from sipwire.transport.iometrics import MetricsLayer
from sipwire.transport.outcome import WriteResult
from sipwire.transport.streams import StreamError
from sipwire.transport.wire import encode_outcome

log = logging.getLogger("sipwire.transport")

#: Queued chunks are joined into one send up to this many bytes: small answers leave together, and a
#: long backlog is sent a piece at a time instead of being copied whole on every flush.
FLUSH_JOIN_BYTES: Final = 65536


class WriteLayer(MetricsLayer):
    """Write queues, outcomes and close of an I/O thread; see the module docstring."""

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
        raw: bool = False,
    ) -> None:
        """Queue bytes on a connection owned here; ``job_id`` 0 is the transport's own write.

        ``raw``: bytes of the WebSocket layer itself (handshake, control frames), sent as they are.
        """
        if trace is not None:
            trace.transport = conn.transport
            trace.local = conn.local
            trace.remote = conn.remote
        if conn.state is ConnState.CLOSED:
            reason = f"connection {conn.id} is closing"
            self._outcome(worker, job_id, conn.id, WriteResult.CONNECTION_GONE, reason, trace=trace)
            return
        message = payload  # the SIP text, for the capture ring, before any WebSocket framing
        if conn.ws is not None and not raw:
            payload = conn.ws.frame(payload)
            if not payload:
                reason = f"the WebSocket of connection {conn.id} is not open"
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
        if self._capture is not None and not raw and message != PONG:  # keep-alive answers are not SIP messages
            self._capture.sent(conn.prefix, message, trace)
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
            data = chunks[0]
            if len(chunks) > 1 and len(data) < FLUSH_JOIN_BYTES:
                data = self._join_front(chunks)
            try:
                sent = conn.stream.send(data)
            except StreamError as error:
                self._close(conn, error.reason, error.result)
                return
            conn.sent_total += sent
            conn.bytes_out += sent
            self.pending_write_bytes -= sent
            if sent == len(data):
                chunks.popleft()
            else:
                chunks[0] = memoryview(data)[sent:]  # the unsent tail, without copying it
            if sent:
                conn.last_activity = self._now
            if not chunks:
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

    @staticmethod
    def _join_front(chunks: deque[bytes | memoryview]) -> bytes:
        """Join the leading small chunks (answers, pongs) into one send of at most about FLUSH_JOIN_BYTES.

        Only the front is joined, so a peer that reads slowly never makes the whole backlog copied again.
        """
        parts = [chunks.popleft()]
        size = len(parts[0])
        while chunks and size + len(chunks[0]) <= FLUSH_JOIN_BYTES:
            part = chunks.popleft()
            parts.append(part)
            size += len(part)
        joined = b"".join(parts)
        chunks.appendleft(joined)
        return joined

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

    def _close_after_flush(self, conn: Connection) -> None:
        """Stop reading; close once queued bytes are out and in-flight messages are answered.

        The wait is bounded by ``shutdown_grace`` (checked on the timer tick).
        """
        if conn.state is ConnState.OPEN or conn.state is ConnState.HANDSHAKE:  # HANDSHAKE: a refused upgrade
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
        self._release(conn, closing=True)
        if conn.stats_slot >= 0:
            self._free_slot(conn)
        conn.stream.close()
        self.hub.forget(conn.id, conn.destination)
        if conn.source is not None:
            self.hub.sources.release(conn.source)
            conn.source = None
        self.counters["closed"] += 1
        if conn.messages_in and self.hub.announce_closes:  # a router's state about it (a flow): tell every worker
            self._closed_ids.append(conn.id)
        if conn.held:  # requests of a peer that is gone: nobody to answer
            self.counters["held_dropped_on_close"] += len(conn.held)
            conn.held.clear()
        if conn.trace is not None:  # still connecting, in its TLS handshake or its WebSocket upgrade
            self._end_connection_span(conn, result.label, reason)
        for job in conn.jobs:
            self._write_done(job.queued_at)
            self._outcome(job.worker, job.job_id, conn.id, result, reason, trace=job.trace)
        conn.jobs.clear()
        log.debug("connection %d %s:%d closed: %s", conn.id, conn.remote[0], conn.remote[1], reason)

    def _end_connection_span(self, conn: Connection, error: str, detail: str) -> None:
        """End the connect or handshake span open on ``conn`` (``error``: its error.type, "" when it worked)."""
        if conn.trace is not None and self._tracing is not None:
            self._tracing.end_connection(conn.trace, conn, error, detail)
        conn.trace = None
