"""An I/O thread's timer tick, and the jobs the supervisor and operators post to it.

The tick (every :data:`~sipwire.transport.iostate.TICK_SECONDS`) enforces the
deadlines the message path only stamps: connect, TLS handshake, close after the
last answers, send, per-message and idle timeouts. It also sends the outcome
records nobody waits for, ends a retiring or stopping thread once its work is
done, and writes the stats block. The jobs: ``retire`` (the pool shrinks: every
connection moves to a thread that stays), ``shutdown`` (stop accepting and
reading, finish what is in flight) and ``close_connection`` (operator action).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Self

from sipwire.transport.connection import ConnState
from sipwire.transport.framing import FramingError, FramingErrorReason
from sipwire.transport.ioconnect import ConnectLayer
from sipwire.transport.iostate import TICK_SECONDS, IOState
from sipwire.transport.outcome import WriteResult

log = logging.getLogger("sipwire.transport")


class ControlLayer(ConnectLayer):
    """Timer tick and supervisor jobs of an I/O thread; see the module docstring."""

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
        ws_ping_interval = settings.ws_ping_interval
        for conn in list(self.conns.values()):
            if conn.state is ConnState.CLOSING:
                if now > conn.deadline:
                    self._close(conn, "closing: answers not done in time", WriteResult.CONNECTION_GONE)
            elif conn.state is ConnState.HANDSHAKE:
                if now > conn.deadline:
                    self._handshake_timeout(conn)
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
            elif conn.ws is not None and now - conn.last_activity > ws_ping_interval and not conn.in_flight:
                self._ws_quiet(conn)
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
            target = min(targets, key=IOState.load_hint)
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
            if conn.ws is not None and conn.state is ConnState.OPEN and not conn.in_flight:
                self._ws_fail(conn, 1001, "server shutting down")  # RFC 6455: 1001, going away (answers first)
            else:
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
