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

The code is split by responsibility into layers, one class per module, each
built on the ones below it (``transport/iostate.py`` says why), bottom first:

  iostate   IOState       the shared state; post and load_hint; selector registration
  iometrics MetricsLayer  stats-block record and slots, latency histograms, snapshots
  iowrite   WriteLayer    write queues, flush, outcome records, close
  ioread    ReadLayer     read, framing, dispatch to workers (parking, overload)
  iothread  IOThread      the loop and its inbox; composes the layers
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from typing import Final, Self

from sipwire.otel.recorder import SPAN_CONNECT, SPAN_HANDSHAKE, WriteTrace
from sipwire.transport.connection import Connection, ConnState
from sipwire.transport.framing import FramingError, FramingErrorReason
from sipwire.transport.hub import DestinationKey, Hub
from sipwire.transport.ioread import ReadLayer
from sipwire.transport.iostate import (
    KIND_CHANNEL,
    KIND_CONN,
    KIND_LISTENER,
    READ,
    TICK_SECONDS,
    WRITE,
    WorkerChannel,
)
from sipwire.transport.outcome import WriteResult
from sipwire.transport.statsblock import HANDSHAKE_BUCKETS_MS, LATENCY_BUCKETS_MS
from sipwire.transport.streams import ERRNO_RESULTS, StreamError, TcpStream, TlsStream
from sipwire.transport.tls import TlsVerifyError, connection_info, verify_server_name
from sipwire.transport.wire import (
    FLAG_PROMPT_OUTCOME,
    DoneRecord,
    WireError,
    WriteRecord,
)

log = logging.getLogger("sipwire.transport")

#: Connections accepted per listener wake-up before other sockets get a turn.
ACCEPT_BATCH: Final = 64


class IOThread(ReadLayer):
    """A selector loop owning a set of connections; see the module docstring."""

    def __init__(self, index: int, hub: Hub[Self]) -> None:
        super().__init__(index, hub)
        self.thread = threading.Thread(target=self._run, name=f"sipwire-io-{index}", daemon=True)

    # -- loop --------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

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
                if kind == KIND_CONN:
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
                elif kind == KIND_CHANNEL:
                    if mask & READ:
                        self._read_channel(target)
                    if mask & WRITE:
                        self._send_channel(target)
                elif kind == KIND_LISTENER:
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

    def _writable(self, conn: Connection) -> None:
        if conn.state is ConnState.CONNECTING:
            self._connected(conn)
            return
        if conn.stream.wants & WRITE:  # a TLS read was waiting to write: retry it
            self._read(conn)
        self._flush(conn)

    # -- connections: accept, connect, move, close ---------------------------------------------

    def add_listener(self, listener: socket.socket, transport: str) -> None:
        """Inbox job for thread 0: start accepting ``transport`` connections on ``listener``."""
        self._listeners.append(listener)
        self.selector.register(listener, READ, (KIND_LISTENER, (listener, transport)))

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

    def adopt(self: Self, conn: Connection, accepted: bool = False) -> None:
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

    # -- control jobs (posted by the supervisor) -----------------------------------------------

    def retire(self, targets: tuple[Self, ...], grace: float) -> None:
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
