"""How connections arrive on an I/O thread: accept, outbound connect, TLS handshake, adoption.

WS and WSS connections are accepted like TCP and TLS ones, with a WebSocket
layer (``transport/wsframing.py``) in place of the SIP framer; they stay in
HANDSHAKE until their upgrade request is answered (after the TLS handshake, for
WSS). Nothing opens a WebSocket outbound: a WebSocket peer is reached over its
own connection.

Thread 0 accepts (up to :data:`ACCEPT_BATCH` per wake-up) and hands each
connection to the least loaded thread, which *adopts* it; adoption is also how
connections move when the pool shrinks (``retire`` in ``iocontrol.py``). A write
job for a destination with no open connection starts a non-blocking connect,
the destination claimed in the hub first so that two threads never open two
connections to one peer. TLS handshakes run on the owning thread, which alone
touches the connection's SSL object; their deadlines, like connect timeouts,
are enforced by the timer tick.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import socket
import time
from typing import Final, Self

from sipwire.otel.recorder import SPAN_CONNECT, SPAN_HANDSHAKE, SPAN_UPGRADE, WriteTrace
from sipwire.transport.connection import Connection, ConnState
from sipwire.transport.hub import DestinationKey
from sipwire.transport.ioread import ReadLayer
from sipwire.transport.iostate import KIND_LISTENER
from sipwire.transport.outcome import WriteResult
from sipwire.transport.poller import READ, WRITE
from sipwire.transport.statsblock import HANDSHAKE_BUCKETS_MS
from sipwire.transport.streams import ERRNO_RESULTS, StreamError, TcpStream, TlsStream
from sipwire.transport.tls import TlsVerifyError, connection_info, verify_server_name
from sipwire.transport.wsframing import WsFramer

#: Connections accepted per listener wake-up before other sockets get a turn.
ACCEPT_BATCH: Final = 64


class ConnectLayer(ReadLayer):
    """Accept, connect, TLS handshake and adoption on an I/O thread; see the module docstring."""

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
            source = hub.sources.admit(address[0])
            if isinstance(source, str):  # over a per-source limit: the reason is its counter label
                sock.close()
                self.counters[f"refused.{source}"] += 1
                self.ratelog.log(
                    logging.WARNING, f"refused.{source}", "refused %s:%d: %s limit reached", address[0], address[1],
                    source,
                )  # fmt: skip
                continue
            self.counters[f"accepted.{transport}"] += 1
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn_local = sock.getsockname()[:2] if wildcard else local
            secure = transport in {"tls", "wss"}
            if secure and self._tls is not None:
                stream: TcpStream | TlsStream = TlsStream(sock, self._tls.server, server_side=True)
            else:
                stream = TcpStream(sock)
            ws = WsFramer(self.ws_limits) if transport in {"ws", "wss"} else None
            conn = Connection(
                hub.new_connection_id(), sock, stream, transport, conn_local, address[:2], self.limits, self._now,
                ws=ws,
            )  # fmt: skip
            conn.source = source
            if secure:
                conn.deadline = self._now + self.settings.tls_handshake_timeout
                if self._tracing is not None:
                    conn.trace = self._tracing.start_connection(SPAN_HANDSHAKE, None)
            elif ws is not None:
                conn.deadline = self._now + self.settings.ws_handshake_timeout
                if self._tracing is not None:
                    conn.trace = self._tracing.start_connection(SPAN_UPGRADE, None)
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
        if self._retire_deadline:  # posted here before a shrink retired this thread: it lives on elsewhere
            target = self.hub.least_loaded_thread()
            self.hub.owners[conn.id] = target
            target.post("adopt", conn, accepted)
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
        if self._retire_deadline:  # a retiring thread opens nothing: the new connection would die with it
            self.hub.least_loaded_thread().post("_connect", key, server_name, job_id, worker, payload, prompt, trace)
            return
        transport, host, port = key
        if transport in {"ws", "wss"}:
            reason = "no outbound WebSocket connections: a WebSocket peer is reached over its own connection"
            self._outcome(worker, job_id, 0, WriteResult.BAD_DESTINATION, reason, trace=trace)
            return
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
        """Advance a TLS handshake, or read a WebSocket's upgrade request once TLS (if any) is done.

        When the TLS handshake succeeds the connection opens and flushes what waited; a WSS one
        waits for its upgrade request first, within ``ws_handshake_timeout``.
        """
        if conn.upgrading:
            self._read(conn)
            return
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
            handshake = conn.trace
            self._end_connection_span(conn, "", "")
            if conn.ws is not None and self._tracing is not None:  # WSS: its upgrade, in the handshake's trace
                conn.trace = self._tracing.after(handshake, SPAN_UPGRADE)
        if self._recorder is not None and self._recorder.metrics:
            self._recorder.handshake(elapsed_ms / 1000.0, info.version, "")
        if conn.ws is None:
            conn.transition(ConnState.OPEN)
        else:  # WSS: the WebSocket upgrade comes next
            conn.deadline = self._now + self.settings.ws_handshake_timeout
        conn.last_activity = self._now
        self.counters["tls_handshakes"] += 1
        self._handshake_buckets[bisect.bisect_left(HANDSHAKE_BUCKETS_MS, elapsed_ms)] += 1
        if conn.out_chunks:
            self._dirty_conns[conn.id] = conn
        self._update_events(conn)
        self._read(conn)  # the peer's first message may already sit decrypted in OpenSSL

    def _handshake_timeout(self, conn: Connection) -> None:
        """HANDSHAKE past its deadline: the TLS handshake, or the WebSocket upgrade, took too long."""
        if conn.upgrading:
            self._ws_upgrade_timeout(conn)
        else:
            self._tls_failed(
                conn, "timeout", WriteResult.TIMEOUT, f"not done within {self.settings.tls_handshake_timeout}s"
            )

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

    def _writable(self, conn: Connection) -> None:
        """A writable socket: its connect finished, a TLS read waits to write, or queued bytes can go."""
        if conn.state is ConnState.CONNECTING:
            self._connected(conn)
            return
        if conn.stream.wants & WRITE:  # a TLS read was waiting to write: retry it
            self._read(conn)
        self._flush(conn)
