"""The WebSocket part of an I/O thread (WS and WSS connections): upgrade, close, keep-alive pings.

The sans-IO layer (:mod:`transport.wsframing`) decides; this layer acts on an
I/O thread: it opens a connection once its upgrade is answered (the 101 is
queued, the upgrade time recorded, its ``ws.upgrade`` span ended), closes it once the last frame or HTTP
refusal is out, counts every case, pings WebSockets that went quiet (browsers
send no keep-alives of their own) and closes those that do not answer. TCP
and TLS connections never come here.
"""

from __future__ import annotations

import bisect
import logging

from sipwire.transport.connection import Connection, ConnState
from sipwire.transport.framing import Ping
from sipwire.transport.iowrite import WriteLayer
from sipwire.transport.outcome import WriteResult
from sipwire.transport.statsblock import HANDSHAKE_BUCKETS_MS
from sipwire.transport.wsframing import WebSocketClosedError, WsControl


class WebSocketLayer(WriteLayer):
    """WebSocket upgrade, close and keep-alive on an I/O thread; see the module docstring."""

    def _ws_control(self, conn: Connection, event: Ping) -> None:
        """Bytes the WebSocket layer sends by itself (101, refusal, pong, close), in order with the answers."""
        assert isinstance(event, WsControl)
        if event.upgraded:
            self._ws_opened(conn)
        if event.counter:
            self.counters[event.counter] += 1
        if event.data:
            self._enqueue(conn, event.data, 0, -1, raw=True)

    def _ws_opened(self, conn: Connection) -> None:
        """The upgrade is accepted: the connection opens; its upgrade time goes to ``ws_handshake_ms``."""
        started = conn.deadline - self.settings.ws_handshake_timeout  # the deadline was set from its start
        elapsed_ms = (self._now - started) * 1000.0
        self._ws_handshake_buckets[bisect.bisect_left(HANDSHAKE_BUCKETS_MS, elapsed_ms)] += 1
        conn.transition(ConnState.OPEN)
        conn.deadline = 0.0
        conn.last_activity = self._now
        if conn.trace is not None:  # its ws.upgrade span
            self._end_connection_span(conn, "", "")
        self._update_events(conn)

    def _ws_closed(self, conn: Connection, error: WebSocketClosedError) -> None:
        """The WebSocket is over (its last bytes are queued): count why, close once they are out."""
        self.counters[error.counter] += 1
        if conn.trace is not None:  # a refused upgrade ends its ws.upgrade span: error.type is the reason
            self._end_connection_span(conn, error.counter.rpartition(".")[2], str(error))
        if not error.peer_closed:
            self.ratelog.log(
                logging.WARNING, error.counter, "closing WebSocket %d from %s:%d: %s",
                conn.id, conn.remote[0], conn.remote[1], error,
            )  # fmt: skip
        self._close_after_flush(conn)

    def _ws_fail(self, conn: Connection, code: int, reason: str) -> None:
        """Close a WebSocket with ``code`` (its close frame first, when it is open)."""
        ws = conn.ws
        assert ws is not None
        data = ws.close(code, reason[:100])
        if data:
            self.counters[f"ws_close.{code}"] += 1
            self._enqueue(conn, data, 0, -1, raw=True)
        self._close_after_flush(conn)

    def _ws_quiet(self, conn: Connection) -> None:
        """A WebSocket silent for ``ws_ping_interval``: ping it, or close it if our last ping got no pong."""
        ws = conn.ws
        assert ws is not None
        if ws.awaiting_pong:
            self.counters["closed_ws_ping_timeout"] += 1
            reason = f"no pong within {self.settings.ws_ping_interval}s"
            self._close(conn, reason, WriteResult.TIMEOUT)
            return
        data = ws.ping()
        if data:
            self.counters["ws_pings_sent"] += 1
            self._enqueue(conn, data, 0, -1, raw=True)

    def _ws_upgrade_timeout(self, conn: Connection) -> None:
        """No complete upgrade request within ``ws_handshake_timeout``: closed without an answer."""
        self.counters["ws_handshake_failed.timeout"] += 1
        self.ratelog.log(
            logging.WARNING, "ws_handshake_failed.timeout", "closing connection %d from %s:%d: no WebSocket upgrade "
            "within %.1fs (%d bytes of a request received%s)", conn.id, conn.remote[0], conn.remote[1],
            self.settings.ws_handshake_timeout, conn.bytes_in, ", after TLS" if conn.tls is not None else "",
        )  # fmt: skip
        self._close(conn, "no WebSocket upgrade in time", WriteResult.TIMEOUT)
