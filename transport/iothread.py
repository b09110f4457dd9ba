"""An I/O thread: one selector loop that owns its connections and its worker channels.

Everything a connection needs happens on its owning thread: accept
hand-off, non-blocking connect, reads, framing, dispatch to a worker,
write jobs, timers and close. Other threads reach this one only through
:meth:`IOThread.post`, which appends ``(method name, args)`` to the inbox
and wakes the selector through an eventfd.

One loop pass:
  1. ``select`` with a timeout up to the next timer tick (none while polling: ``busy_poll_us``);
  2. handle ready sockets: connections (read, frame, batch messages per
     worker), worker channels (write jobs, done counts), the listener
     (thread 0 only), the inbox;
  3. flush every connection that got replies (one ``send`` per connection),
     announce the connections closed in this pass to every worker, and
     flush every channel that got records (one ``send`` per channel);
  4. on a tick: connect timeouts, per-message timeouts, idle connections.

Jobs about a connection this thread does not own (it moved or closed) are
forwarded to the owner found in the hub, or reported as ``connection_gone``.

The code is split by responsibility into layers, one class per module, each
built on the ones below it (``transport/iostate.py`` says why), bottom first:

  iostate   IOState       the shared state; post and load_hint; selector registration
  iometrics MetricsLayer  stats-block record and slots, latency histograms, snapshots
  iowrite   WriteLayer    write queues, flush, outcome records, close
  iows      WebSocketLayer  WebSocket upgrade, close and keep-alive pings (WS, WSS)
  ioread    ReadLayer     read, framing, dispatch to workers (parking, overload)
  ioconnect ConnectLayer  accept, connect, TLS handshake, adopting a connection
  iochannel ChannelLayer  worker channels: batches out, write jobs and done counts in
  iocontrol ControlLayer  the timer tick; retire, shutdown, close_connection
  iothread  IOThread      the loop, draining the inbox, the end; composes the layers
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Self

from sipwire.transport.connection import Connection, ConnState
from sipwire.transport.hub import Hub
from sipwire.transport.iochannel import ChannelLayer
from sipwire.transport.iocontrol import ControlLayer
from sipwire.transport.iostate import KIND_CHANNEL, KIND_CONN, KIND_LISTENER
from sipwire.transport.outcome import WriteResult
from sipwire.transport.poller import READ, WRITE

log = logging.getLogger("sipwire.transport")


class IOThread(ChannelLayer, ControlLayer):
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
        busy_poll = self.settings.busy_poll_us / 1e6
        poll_until = 0.0  # busy_poll_us: after activity, poll rather than sleep until then
        while self._running:
            timeout = max(0.0, self._next_tick - monotonic())
            if poll_until and monotonic() < poll_until:
                timeout = 0.0
            events = select(timeout)
            started = self._now = monotonic()
            for (kind, target), mask in events:
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
            if self._closed_ids:
                self._announce_closed()
            if self._dirty_channels:
                channels = self._dirty_channels
                self._dirty_channels = set()
                for channel in channels:
                    self._send_channel(channel)
            now = monotonic()
            self._busy += now - started
            if busy_poll and events:
                poll_until = now + busy_poll
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
                self._send_channel(channel)  # outcomes still owed: late "sent"s, the failures just reported
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
