"""The transport process: listeners, the I/O pool, the worker pool and the control socket.

The supervisor runs on the main thread. It owns no connection; it starts
the parts, then reconciles what runs with what is wanted: the I/O pool
size (changed at runtime through the control socket) and the worker pool
(restarting workers that died). Signal handlers only record the request;
the loop acts on it (SIGTERM/SIGINT: stop accepting, finish in-flight
messages and queued writes for ``shutdown_grace`` seconds, stop workers).
Control requests are answered by the :class:`~sipwire.transport.serverctl.ControlOps` layer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from sipwire.config import Settings, cpu_set
from sipwire.errors import ConfigurationError, ControlError
from sipwire.otel.setup import transport_telemetry
from sipwire.statedir import runtime_directory
from sipwire.transport.capturequery import CaptureQuery
from sipwire.transport.connection import format_address
from sipwire.transport.control import ControlServer
from sipwire.transport.hub import Hub
from sipwire.transport.iothread import IOThread
from sipwire.transport.serverctl import SNAPSHOT_TIMEOUT_SECONDS, ControlOps
from sipwire.transport.statsblock import (
    HANDSHAKE_BUCKETS_MS,
    HISTOGRAM_NAMES,
    HISTOGRAM_TLS,
    HISTOGRAM_WS,
    HISTOGRAMS,
    LATENCY_BUCKETS_MS,
    STATUS_RUNNING,
    SUPERVISOR_INTERVAL_SECONDS,
    Capacities,
    HeaderFigures,
    StatsError,
    StatsWriter,
    new_block_name,
    publish_block_name,
    published_block_name,
    remove_stale_block,
)
from sipwire.transport.tls import TlsConfigError, build_contexts
from sipwire.transport.totals import Totals
from sipwire.transport.workerpool import WorkerPool

if TYPE_CHECKING:
    from sipwire.otel.pipeline import Telemetry

log = logging.getLogger("sipwire.transport")

#: How often the supervisor checks workers and the pool size.
SUPERVISOR_TICK_SECONDS: Final = 0.1
LISTEN_BACKLOG: Final = 1024
#: How long the start waits for the workers to be ready before it listens anyway (a slow router setup).
WORKERS_READY_SECONDS: Final = 30.0
#: How long stopping waits for the last spans to be exported (a dead collector must not hold the stop).
TELEMETRY_STOP_SECONDS: Final = 2.0


class StartupError(ConfigurationError):
    """The transport cannot start (address in use, bad settings...)."""


class TransportServer(ControlOps):
    """Owns the whole transport process; see the module docstring."""

    def __init__(self, settings: Settings, announce_closes: bool = True) -> None:
        """``announce_closes``: the workers' router has a ``connections_closed`` hook (else nobody is told)."""
        self.settings = settings
        runtime_directory(settings)  # refuses one another user could have planted, before anything is written
        try:
            tls = build_contexts(settings) if settings.tls or settings.wss else None
        except TlsConfigError as error:
            raise StartupError(f"TLS: {error}") from error
        self.hub: Hub[IOThread] = Hub(settings, settings.workers, tls)
        self.hub.announce_closes = announce_closes
        self.workers = WorkerPool(settings)
        self.listening: dict[str, str] = {}
        self.started_at = time.time()
        self._desired_threads = settings.threads
        self._retired: list[IOThread] = []
        self._retired_counters: dict[str, int] = {}
        # Guards _retired and _retired_counters (supervisor writes, control clients read), so a thread's
        # counters are counted exactly once while it drains and after it is joined: they never dip.
        self._retired_lock = threading.Lock()
        self._lock = threading.Lock()  # serialises resizes requested from control clients
        self._stop_requested = False
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._control: ControlServer | None = None
        # Stats block: the supervisor writes the header, workers, counters and histograms.
        self.stats: StatsWriter | None = None
        self._stats_due = 0.0
        self._stats_failed = False
        self._retired_totals = Totals.empty(settings.workers)  # of joined threads, under _retired_lock
        self._worker_progress = [(0, 0.0)] * settings.workers  # (done, heartbeat) last written
        self.telemetry: Telemetry | None = None
        self._restarts_wanted: deque[int] = deque()  # workers whose channel broke (I/O threads append)
        self.hub.restart_worker = self._request_worker_restart
        # The call-flow capture's reader (control ops calls and call); the I/O threads append to hub.capture.
        capture = self.hub.capture
        self._captured = CaptureQuery(capture, settings.capture_bodies) if capture is not None else None

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        # The control socket first: it refuses to start when another transport owns this
        # instance, before anything else is bound or started. It serves only once all is up.
        self._control = ControlServer(self.settings.control_path, self.handle_control)
        try:
            listeners = self._bind()
        except StartupError:
            self._control.close()
            raise
        self._open_stats(listeners)
        self.telemetry = transport_telemetry(self.settings.instance, self.statistics, self.settings.trace_rate_limit)
        self.hub.recorder = self.telemetry.recorder if self.telemetry is not None else None
        if cpus := cpu_set(self.settings.cpu_affinity):  # before the I/O threads and workers: they inherit it
            os.sched_setaffinity(0, cpus)
            log.info("I/O threads and workers run on CPUs %s", ",".join(map(str, sorted(cpus))))
        threads = tuple(IOThread(index, self.hub) for index in range(self.settings.threads))
        self.hub.threads = threads
        self.workers.start(threads)
        for thread in threads:
            thread.start()
        # Bound, not yet listening: until every worker can route, a connection is refused, not left waiting.
        if starting := self.workers.wait_ready(WORKERS_READY_SECONDS):
            log.warning("workers %s not ready after %.0fs; listening anyway", starting, WORKERS_READY_SECONDS)
        for listener, transport in listeners:
            try:
                listener.listen(LISTEN_BACKLOG)
            except OSError as error:  # another process listened on it since the bind
                address = self.listening[transport]
                raise StartupError(f"cannot listen on {transport.upper()} {address}: {error.strerror}") from error
            threads[0].post("add_listener", listener, transport)
        self._control.start()
        for name, address in self.listening.items():
            log.info("listening on %s %s", name, address)
        if self.hub.tls is not None:
            log.info(
                "TLS certificate %s, SHA-256 fingerprint %s", self.hub.tls.certificate_path, self.hub.tls.fingerprint
            )
        log.info(
            "transport ready: pid %d, %d I/O threads, %d workers, router %s, control socket %s",
            os.getpid(), len(threads), len(self.workers), self.settings.router, self.settings.control_path,
        )  # fmt: skip

    def _bind(self) -> list[tuple[socket.socket, str]]:
        """Bind every configured address (an address in use stops the start here); :meth:`start` listens later."""
        listeners: list[tuple[socket.socket, str]] = []
        settings = self.settings
        for transport, address in (
            ("tcp", settings.tcp_address),
            ("tls", settings.tls_address),
            ("ws", settings.ws_address),
            ("wss", settings.wss_address),
        ):
            if address is None:
                continue
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as error:
                sock.close()
                for opened, _ in listeners:
                    opened.close()
                raise StartupError(
                    f"cannot listen on {transport.upper()} {format_address(address)}: {error.strerror}"
                ) from error
            sock.setblocking(False)
            self.listening[transport] = format_address(sock.getsockname()[:2])
            listeners.append((sock, transport))
        if not listeners:
            raise StartupError("no listener configured: set tcp, tls, ws or wss")
        return listeners

    # -- supervisor loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`request_stop`), then shut down cleanly."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ)
        try:
            while not self._stop_requested:
                if selector.select(SUPERVISOR_TICK_SECONDS):
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 512)
                while self._restarts_wanted:
                    self.workers.replace(self._restarts_wanted.popleft(), "a channel to it broke")
                self.workers.reap(self.hub.threads)
                self._reconcile_threads()
                self._join_retired()
                self._write_stats_if_due()
        finally:
            selector.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.shutdown()

    def _request_worker_restart(self, worker: int) -> None:
        """From an I/O thread: the supervisor replaces the worker (only an append and a wake-up here)."""
        self._restarts_wanted.append(worker)
        os.write(self._wake_write, b"w")

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.request_stop()

    def request_stop(self) -> None:
        """Ask the supervisor loop to shut down (safe from signal handlers and other threads)."""
        self._stop_requested = True
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"s")

    def shutdown(self) -> None:
        log.info(
            "shutting down: no new connections, finishing in-flight work for up to %.1fs", self.settings.shutdown_grace
        )
        if self._control is not None:
            self._control.close()
        if self.stats is not None:
            self._write_stats_if_due(force=True)
            self.stats.mark_stopping()
        threads = self.hub.threads
        for thread in threads:
            thread.post("shutdown", self.settings.shutdown_grace)
        deadline = time.monotonic() + self.settings.shutdown_grace + 1.0
        for thread in threads:
            thread.thread.join(max(0.0, deadline - time.monotonic()))
        self.workers.stop(timeout=2.0)
        if self.stats is not None:
            # A thread still running past the grace may write its slots yet: keep the mapping for it.
            self.stats.unlink(unmap=not any(thread.thread.is_alive() for thread in threads))
        if self.telemetry is not None:
            self.telemetry.shutdown(TELEMETRY_STOP_SECONDS)
        os.close(self._wake_read)
        os.close(self._wake_write)
        log.info("transport stopped")

    # -- resize ----------------------------------------------------------------------------------

    def resize(self, size: int) -> None:
        """Set the wanted I/O pool size; the supervisor loop reconciles and this waits for it."""
        if not 1 <= size <= self.settings.max_threads:
            raise ControlError(f"thread pool size {size} is outside 1..{self.settings.max_threads}")
        with self._lock:
            self._desired_threads = size
            os.write(self._wake_write, b"r")
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT_SECONDS
            while len(self.hub.threads) != size and time.monotonic() < deadline:
                time.sleep(0.01)
            if len(self.hub.threads) != size:
                raise ControlError(f"resize to {size} did not finish within {SNAPSHOT_TIMEOUT_SECONDS}s")

    def _reconcile_threads(self) -> None:
        wanted = self._desired_threads
        threads = self.hub.threads
        if len(threads) == wanted:
            return
        if len(threads) < wanted:
            added = tuple(IOThread(index, self.hub) for index in range(len(threads), wanted))
            for thread in added:
                for worker in range(len(self.workers)):
                    self.workers.connect(thread, worker)
            self.hub.threads = threads + added
            for thread in added:
                thread.start()
            log.info("I/O pool grown from %d to %d threads", len(threads), wanted)
            return
        keep, retire = threads[:wanted], threads[wanted:]
        with self._retired_lock:
            self.hub.threads = keep
            self._retired.extend(retire)
        for thread in retire:
            thread.post("retire", keep, self.settings.shutdown_grace)
        log.info("I/O pool shrinking from %d to %d threads: moving their connections", len(threads), wanted)

    def _join_retired(self) -> None:
        for thread in list(self._retired):
            if not thread.thread.is_alive():
                with self._retired_lock:
                    self._retired.remove(thread)
                    for name, value in thread.counters.items():
                        self._retired_counters[name] = self._retired_counters.get(name, 0) + value
                    self._retired_totals.add(thread.stats_totals())
                if self.stats is not None and thread.stats_record >= 0:
                    self.stats.clear_thread(thread.stats_record)  # its writer is gone: ours now
                    self.hub.thread_records.give(thread.stats_record)
                log.info("I/O thread %d retired", thread.index)

    # -- stats block (layout and rules: transport/statsblock/layout.py) --------------------------

    def _open_stats(self, listeners: list[tuple[socket.socket, str]]) -> None:
        """Create this instance's stats block (replacing one a dead transport left) before any thread."""
        settings = self.settings
        try:
            previous = published_block_name(settings)
            if previous is not None:
                remove_stale_block(previous)  # a transport killed with SIGKILL leaves its block behind
            stats = StatsWriter.create(
                new_block_name(settings), Capacities.for_settings(settings), settings.instance,
                tuple(HISTOGRAMS.values()),
            )  # fmt: skip
            publish_block_name(settings, stats.name)
        except (StatsError, OSError) as error:
            for sock, _ in listeners:
                sock.close()
            raise StartupError(f"stats block: {error}") from error
        self.stats = stats
        self.hub.set_stats(stats)
        log.info("stats block %s (%d bytes)", stats.name, stats.layout.total)

    def _write_stats_if_due(self, force: bool = False) -> None:
        """Header, workers, counters and histograms, every SUPERVISOR_INTERVAL_SECONDS.

        A failure is logged once and never stops the supervisor (stats must not break traffic).
        """
        now = time.monotonic()
        if self.stats is None or (now < self._stats_due and not force):
            return
        self._stats_due = now + SUPERVISOR_INTERVAL_SECONDS
        try:
            self._write_stats(self.stats, now)
        except Exception:
            if not self._stats_failed:
                log.exception("writing the stats block failed (logged once)")
            self._stats_failed = True

    def _write_stats(self, stats: StatsWriter, now: float) -> None:
        with self._retired_lock:
            active = self.hub.threads
            draining = tuple(self._retired)
            totals = self._retired_totals.copy()
            counters = dict(self._retired_counters)
        active_totals = [thread.stats_totals() for thread in active]
        for thread_totals in active_totals + [thread.stats_totals() for thread in draining]:
            totals.add(thread_totals)
            for name, value in thread_totals.counters.items():
                counters[name] = counters.get(name, 0) + value
        if self.telemetry is not None:
            counters.update(self.telemetry.counters())  # spans exported and dropped at each bounded step
        stats.write_counters(counters)
        stats.write_histogram(HISTOGRAM_TLS, HANDSHAKE_BUCKETS_MS, totals.handshake, 0.0)
        stats.write_histogram(HISTOGRAM_WS, HANDSHAKE_BUCKETS_MS, totals.ws_handshake, 0.0)
        for name, histogram in totals.latency.items():
            stats.write_histogram(HISTOGRAM_NAMES.index(name), LATENCY_BUCKETS_MS, histogram.counts, histogram.sum_ms)
        workers = self.workers.statistics()
        in_flight = [sum(t.outstanding[index] for t in active_totals) for index in range(len(workers))]
        for worker in workers:
            done = totals.done_by_worker[worker.index]
            last_done, heartbeat = self._worker_progress[worker.index]
            if worker.alive and (not in_flight[worker.index] or done > last_done):
                heartbeat = now  # idle, or finishing messages: not stuck
            self._worker_progress[worker.index] = (done, heartbeat)
            started = now - worker.uptime if worker.alive else 0.0
            stats.write_worker(
                worker.index, worker.pid, worker.alive, in_flight[worker.index], done, worker.restarts, heartbeat,
                started,
            )  # fmt: skip
        stats.write_header(
            HeaderFigures(
                status=STATUS_RUNNING,
                threads_wanted=self._desired_threads,
                threads_running=len(active),
                workers_wanted=len(workers),
                workers_alive=sum(1 for worker in workers if worker.alive),
                max_connections=self.settings.max_connections,
                connections=self.hub.connection_count(),
                slots_used=self.hub.slots.used,
                slots_refused=self.hub.slots.refused,
                thread_records_refused=self.hub.thread_records.refused,
                pending_write_bytes=sum(thread.pending_write_bytes for thread in active + draining),
                queue_depth=sum(t.inbox_depth for t in active_totals),
                dispatch_in_flight=sum(in_flight),
                listening=self.listening,
            )
        )

    # -- snapshots and control ------------------------------------------------------------------
