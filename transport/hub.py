"""What the I/O threads share: who owns which connection, and where to send.

Nothing here guards a connection: the owner registry only says *which*
thread may touch one. Its entries are plain dict reads and writes (atomic
in CPython); a job for a connection goes to the owner's inbox, and a
thread that no longer owns it forwards the job to the current owner.

The destination map (transport, host, port) -> connection id is the one
place where two threads could race (both opening a connection to the same
peer), so it alone has a lock.

The hub knows an I/O thread only as a :class:`ThreadHandle`, the few
members it and the threads use of one another, and is generic in the
thread class: the server's ``Hub[IOThread]`` hands out its ``IOThread``
objects, yet this module imports nothing from the I/O thread's modules,
so they form no import cycle.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from sipwire.config import Settings
from sipwire.transport.capture import CaptureRing
from sipwire.transport.sources import SourceLimits
from sipwire.transport.statsblock import FreeList, StatsWriter
from sipwire.transport.tls import TlsContexts

if TYPE_CHECKING:
    from sipwire.otel.recorder import SpanRecorder

DestinationKey = tuple[str, str, int]


class ThreadHandle(Protocol):
    """What the hub, and one I/O thread of another, may use of an I/O thread."""

    #: False once the thread has finished: jobs posted to it then go to thread 0.
    alive: bool
    #: Bytes queued on the thread's connections (the global write-queue cap sums them).
    pending_write_bytes: int

    def post(self, method: str, *args: Any) -> None:
        """Run ``<method>(*args)`` on that thread, through its inbox."""
        ...

    def load_hint(self) -> int:
        """What 'least loaded' compares: connections owned plus jobs waiting."""
        ...


ThreadT = TypeVar("ThreadT", bound=ThreadHandle)


def _no_supervisor(worker: int) -> None:
    """Until a supervisor takes over restarts (tests that run I/O threads alone): nothing to restart."""


class Hub(Generic[ThreadT]):
    """Registry of threads, connection owners and outbound destinations."""

    def __init__(self, settings: Settings, worker_count: int, tls: TlsContexts | None = None) -> None:
        self.settings = settings
        #: The shared-memory stats block (None: not published; see :meth:`set_stats`).
        self.stats: StatsWriter | None = None
        self.slots = FreeList(0)
        self.thread_records = FreeList(0)
        self.worker_count = worker_count
        #: Built once at start; SSL objects made from them never leave this process.
        self.tls = tls
        #: Whether workers hear of closed connections (CONNECTIONS_CLOSED): only if their router asks.
        self.announce_closes = True
        #: Telemetry's I/O-thread side (set before the threads start); None when telemetry is off.
        self.recorder: SpanRecorder | None = None
        #: Active I/O threads, index 0 first; replaced (never mutated) on resize.
        self.threads: tuple[ThreadT, ...] = ()
        self.owners: dict[int, ThreadT] = {}
        self._destinations: dict[DestinationKey, int] = {}
        self._destinations_lock = threading.Lock()
        self._ids = itertools.count(first_connection_id())
        #: The messages carried, for the console's call-flow view (transport/capture.py); None when off.
        self.capture = CaptureRing(settings.capture_bytes) if settings.capture else None
        #: Per-source connection and request limits (transport/sources.py).
        self.sources = SourceLimits(settings)
        #: Set by the supervisor: asks it, from any thread, to restart a worker whose channel broke.
        self.restart_worker: Callable[[int], None] = _no_supervisor

    def new_connection_id(self) -> int:
        """Unique across restarts of the instance: see :func:`first_connection_id`."""
        return next(self._ids)

    def owner(self, conn_id: int) -> ThreadT | None:
        return self.owners.get(conn_id)

    def connection_count(self) -> int:
        """Open connections plus those on their way to a new owner."""
        return len(self.owners)

    def set_stats(self, stats: StatsWriter) -> None:
        """Publish to ``stats`` (before any I/O thread exists). Connection slots and thread records
        come from two free lists, the only locks the stats writers ever take."""
        self.stats = stats
        self.slots = FreeList(stats.capacities.slots)
        self.thread_records = FreeList(stats.capacities.threads)

    def alloc_slot(self, first_try: bool = True) -> int:
        """A free connection slot in the stats block, or -1 (none left, or no block).

        A connection refused a slot is counted once (``first_try``) and asks again on later ticks.
        """
        return self.slots.take(first_try)

    def free_slot(self, slot: int) -> None:
        """Give back a slot its owner has already cleared."""
        self.slots.give(slot)

    def pending_write_bytes(self) -> int:
        return sum(thread.pending_write_bytes for thread in self.threads)

    def least_loaded_thread(self) -> ThreadT:
        """The active thread with the fewest connections (ties: lowest index)."""
        threads = self.threads
        best = threads[0]
        best_load = best.load_hint()
        for thread in threads[1:]:
            load = thread.load_hint()
            if load < best_load:
                best, best_load = thread, load
        return best

    def claim_destination(self, key: DestinationKey, conn_id: int) -> int:
        """Register ``conn_id`` for ``key`` unless one exists; return the winner's id."""
        with self._destinations_lock:
            existing = self._destinations.get(key)
            if existing is not None and existing in self.owners:
                return existing
            self._destinations[key] = conn_id
            return conn_id

    def destination(self, key: DestinationKey) -> int | None:
        conn_id = self._destinations.get(key)
        return conn_id if conn_id is not None and conn_id in self.owners else None

    def forget(self, conn_id: int, destination: DestinationKey | None) -> None:
        self.owners.pop(conn_id, None)
        if destination is not None:
            with self._destinations_lock:
                if self._destinations.get(destination) == conn_id:
                    del self._destinations[destination]


def first_connection_id() -> int:
    """Where a transport's connection ids start: its start time in microseconds.

    What outlives the process names connections by id: the registrar's bindings (in the instance's database) and
    the proxy's signed Route and Via tokens (under the instance's key). Ids counted from 1 at every start made
    them name whoever connected first after a restart. Starting at the clock, a later start's ids are above an
    earlier one's unless that one opened more than a connection per microsecond of its life; the values stay
    below 2**53, exact in the console's JavaScript.
    """
    return time.time_ns() // 1000
