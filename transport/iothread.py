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
  ioconnect ConnectLayer  accept, connect, TLS handshake, adopting a connection
  iochannel ChannelLayer  worker channels: batches out, write jobs and done counts in
  iothread  IOThread      the loop and its inbox; composes the layers
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Self

from sipwire.transport.connection import Connection, ConnState
from sipwire.transport.framing import FramingError, FramingErrorReason
from sipwire.transport.hub import Hub
from sipwire.transport.iochannel import ChannelLayer
from sipwire.transport.iostate import (
    KIND_CHANNEL,
    KIND_CONN,
    KIND_LISTENER,
    READ,
    TICK_SECONDS,
    WRITE,
)
from sipwire.transport.outcome import WriteResult

log = logging.getLogger("sipwire.transport")


class IOThread(ChannelLayer):
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
