"""The shared-memory stats block: one layout for its single writer and its readers.

The transport process writes, tools and the console read; a reader never
talks to the transport, so ``sipwire ctl stats`` answers even when every
I/O thread is saturated. One block per instance, a POSIX shared-memory
segment (``multiprocessing.shared_memory``) named by :func:`block_name`
from the uid, the instance and its runtime directory, so two instances
(or two users) never share one.

Who writes what (one writer per record at any time, never a lock):

* the supervisor loop: the dynamic header, worker records, the counter
  table and the histograms, every :data:`SUPERVISOR_INTERVAL_SECONDS`;
* each I/O thread, on its timer tick: its own thread record, and the
  slots of the connections it owns that changed since it last wrote them.
  A connection takes a slot from a free list (:class:`FreeList`, in the
  hub) the first time it is written and gives it back on close; the slot
  travels with the connection when it moves to another thread, and the
  hand-over through the inbox orders the old owner's last write before
  the new owner's first.

Byte layout
===========

Every integer and float is little-endian with standard sizes (``struct``
``<``); strings are UTF-8 (addresses ASCII), NUL-padded, cut at their field
size (a cut in the middle of a character is dropped by readers). Times
named "mono" are ``CLOCK_MONOTONIC`` seconds (``time.monotonic()``, one
clock for every process of the host); "wall" are UNIX seconds. The block
is a sequence of regions, each record starting on a 64-byte boundary::

    offset                     size                      region
    0                          256                       static header (written once)
    256                        256                       dynamic header record
    512                        128 * thread_records      I/O thread records
    ...                        64 * worker_records       worker records
    ...                        64 + 64 * counter_cap     counter table (one record)
    ...                        576 * 3                   histograms (one record each)
    ...                        384 * slots               connection slots
    total (multiple of 64)

:func:`Capacities.layout` computes the offsets; readers compute them from
the capacities in the static header and refuse a block whose size does not
match (bounds are checked before any read).

Static header (no seqlock: written before the magic, never changed after)::

    0    8  magic b"SIPWSTAT" (written last: a block without it is still being made)
    8    4  u32 layout version (:data:`LAYOUT_VERSION`)
    12   4  u32 reserved
    16   8  u64 total size in bytes
    24   4  u32 writer pid
    28   4  u32 thread records (2 * max_threads: threads still draining after a shrink keep theirs)
    32   8  f64 start time, wall
    40   8  f64 start time, mono
    48   4  u32 worker records
    52   4  u32 connection slots (max_connections)
    56   4  u32 counter capacity
    60   4  u32 histogram count
    64   64 str instance name
    128  128 reserved

Every other record starts with the same 16 bytes, its seqlock::

    0    8  u64 sequence: odd while the writer is inside the record, even when done; 0: never written
    8    4  u32 CRC-32 of the body (zlib.crc32 of the bytes the record defines as covered)
    12   4  u32 reserved
    16   .. body (offsets below are from the record's start)

Dynamic header record (256 bytes; body covered: 16..256)::

    16   8  f64 last update, wall          24   8  f64 last update, mono (the supervisor's heartbeat)
    32   8  u64 updates written            40   1  u8 status: 1 running, 2 stopping, 3 stopped
    41   1  reserved                       42   2  u16 I/O threads wanted
    44   2  u16 I/O threads running        46   2  u16 workers wanted
    48   2  u16 workers alive              50   2  reserved
    52   4  u32 max_connections            56   4  u32 open connections (owner registry)
    60   4  u32 slots in use               64   8  u64 connections that found no free slot
    72   8  u64 threads that found no free thread record
    80   8  u64 pending write bytes        88   4  u32 inbox depth (all threads)
    92   4  u32 messages dispatched, not yet done
    96   48 str TCP listening address      144  48 str TLS listening address (empty: none)
    192  64 reserved

I/O thread record (128 bytes; body covered: 16..128)::

    16   1  u8 state: 0 unused, 1 active, 2 retiring (draining after a shrink)
    17   1  reserved                       18   2  u16 pool index
    20   4  u32 connections owned          24   8  f64 busy ratio over the last full second (0..1)
    32   8  f64 loop lag, ms               40   4  u32 inbox depth
    44   4  u32 messages dispatched to workers, not yet done
    48   8  u64 inbox jobs done            56   8  u64 pending write bytes
    64   8  f64 heartbeat, mono (the tick that wrote this record)
    72   8  f64 started, mono              80   48 reserved

Worker record (64 bytes, one per worker index; body covered: 16..64)::

    16   2  u16 index                      18   1  u8 alive
    19   1  reserved                       20   4  u32 pid (0: not running)
    24   4  u32 messages in flight         28   4  u32 restarts
    32   8  u64 messages done (DONE records received from it, all threads)
    40   8  f64 heartbeat, mono: the last time it was seen alive and idle, or finishing messages;
             a worker holding messages without finishing any keeps an old heartbeat
    48   8  f64 started, mono (0: not running)
    56   8  reserved

Counter table (one record, 64 + 64 * counter_cap bytes)::

    16   4  u32 entries used (<= counter_cap)   20   4  reserved
    24   8  u64 counters left out (no room, or a name longer than 56 bytes)
    32   8  u64 sum of the values left out      40   24 reserved
    64   .. entries, 64 bytes each: 56 str name, 8 u64 value
    covered: 16 .. 64 + 64 * used (a reader refuses used > counter_cap)

Histogram record (576 bytes; body covered: 16..576); records in this order:
``tls_handshake_ms`` (bounds :data:`HANDSHAKE_BUCKETS_MS`),
``dispatch_latency_ms`` and ``write_latency_ms`` (both :data:`LATENCY_BUCKETS_MS`).
The bounds are written into the record, so a reader needs no copy of them::

    16   32 str name                       48   4  u32 n: bounds used (n <= 30)
    52   4  reserved                       56   8  u64 observations
    64   8  f64 sum of observations, ms
    72   240 f64[30] upper bounds, ms (n used, ascending)
    312  248 u64[31] bucket counts, not cumulative (n + 1 used: the last one is +Inf)
    560  16 reserved

Connection slot (384 bytes; body covered: 16..384; a free slot has id 0)::

    16   8  u64 connection id (0: free)    24   1  u8 state: 1 connecting, 2 handshake, 3 open, 4 closing
    25   1  u8 transport: 1 tcp, 2 tls     26   1  u8 flags: bit 0 outbound
    27   1  reserved                       28   2  u16 owner I/O thread index
    30   2  u16 local port                 32   2  u16 remote port
    34   2  reserved                       36   4  u32 messages in flight
    40   8  f64 created, mono              48   8  f64 last activity, mono
    56   8  u64 bytes in                   64   8  u64 bytes out
    72   8  u64 messages in                80   8  u64 messages out (write jobs queued)
    88   8  u64 pending write bytes        96   8  f64 TLS handshake duration, ms (0: none)
    104  48 str local host                 152  48 str remote host
    200  16 str TLS version                216  56 str TLS cipher
    272  48 str TLS server name            320  64 str TLS peer certificate subject

Torn reads
==========

A reader never blocks the writer and never returns a torn record. Each
record is a seqlock: the writer stores an odd sequence, the body and its
CRC, then the next even sequence; a reader loads the sequence, copies the
record, loads the sequence again, and keeps the copy only if both loads
are equal and even. The sequence is one aligned 8-byte word written and
read through a ``memoryview`` cast to ``Q`` (a single ``mov``). On x86-64
(TSO) stores become visible in program order and loads are not reordered
with other loads, so a copy taken between two equal even loads saw no
store of a later write, and one that raced a write sees a changed or odd
sequence and is retried (at most :data:`READ_ATTEMPTS` times, sleeping a
little after the first few, then the record is reported unreadable rather
than waited for). Python offers no memory barriers, so on weakly ordered
CPUs (ARM) the sequence check alone could let a torn copy through; the
CRC-32 over each body catches that case too (such a copy is counted in
:attr:`ReadCounts.crc_failures` and retried), and tests use it to prove
every record they read is whole. Whole-region reads (all connection
slots) load every sequence first, copy the region once, load them again,
and re-read only the slots whose sequence moved.

Liveness: the writer's pid is in the static header and the supervisor's
heartbeat in the dynamic one; readers flag a block whose pid is gone or
whose heartbeat is older than :data:`STALE_SECONDS` (:class:`BlockHeader`)
and :meth:`StatsReader.require_live` turns that into
:class:`StatsWriterGoneError`. A clean shutdown marks the block stopped and
unlinks it; a new writer replaces the block of a dead one.

``multiprocessing.resource_tracker``: on Python < 3.13 every
``SharedMemory`` attach registers the segment, and the tracker unlinks it
when the attaching process exits, which would let a ``ctl`` run delete a
live transport's block. Every attach here unregisters at once (3.13+:
``track=False``); the writer registers again just before its own unlink
so the tracker's books balance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Self
from zlib import crc32

if TYPE_CHECKING:
    from sipwire.config import Settings
    from sipwire.transport.connection import Connection

MAGIC: Final = b"SIPWSTAT"
#: Bump on any change of the layout above; readers refuse other versions.
LAYOUT_VERSION: Final = 1

#: How often the supervisor rewrites the header, workers, counters and histograms.
SUPERVISOR_INTERVAL_SECONDS: Final = 0.25
#: A writer whose heartbeat is older than this is reported stale (it writes 4 times a second).
STALE_SECONDS: Final = 5.0
#: Seqlock read attempts per record before it is reported unreadable; the first
#: :data:`SPIN_ATTEMPTS` retry at once, the rest sleep :data:`RETRY_SLEEP_SECONDS`
#: (a writer descheduled inside a record needs the CPU back), so one record costs a
#: reader at most about 60 ms.
READ_ATTEMPTS: Final = 64
SPIN_ATTEMPTS: Final = 4
RETRY_SLEEP_SECONDS: Final = 0.001

#: Upper bounds (ms) of the TLS handshake duration histogram; one more bucket counts the rest.
HANDSHAKE_BUCKETS_MS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)
#: Upper bounds (ms) of the dispatch and write-job latency histograms; one more bucket counts the rest.
LATENCY_BUCKETS_MS: Final = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)
HISTOGRAM_NAMES: Final = ("tls_handshake_ms", "dispatch_latency_ms", "write_latency_ms")
HISTOGRAM_TLS, HISTOGRAM_DISPATCH, HISTOGRAM_WRITE = range(3)

STATUS_RUNNING, STATUS_STOPPING, STATUS_STOPPED = 1, 2, 3
STATUS_NAMES: Final = {0: "starting", STATUS_RUNNING: "running", STATUS_STOPPING: "stopping", STATUS_STOPPED: "stopped"}
THREAD_UNUSED, THREAD_ACTIVE, THREAD_RETIRING = 0, 1, 2
THREAD_STATE_NAMES: Final = {THREAD_ACTIVE: "active", THREAD_RETIRING: "retiring"}
STATE_CODES: Final = {"connecting": 1, "handshake": 2, "open": 3, "closing": 4}
STATE_NAMES: Final = {code: name for name, code in STATE_CODES.items()}
TRANSPORT_CODES: Final = {"tcp": 1, "tls": 2}
TRANSPORT_NAMES: Final = {code: name for name, code in TRANSPORT_CODES.items()}

#: Counter capacity: sipwire has a few dozen names today (``framing_error.<reason>``,
#: ``write.<result>``...); four times that leaves room, and overflow is counted.
COUNTER_CAPACITY: Final = 256
COUNTER_NAME_BYTES: Final = 56
HISTOGRAM_MAX_BOUNDS: Final = 30
#: Sanity bounds a reader checks before trusting capacities read from a block.
_MAX_CAPACITY: Final = {"threads": 4096, "workers": 1024, "slots": 1 << 22, "counters": 65536, "histograms": 16}

_ALIGN: Final = 64
_SEQ_BYTES: Final = 16  # sequence, CRC, reserved
STATIC_BYTES: Final = 256
HEADER_BYTES: Final = 256
THREAD_BYTES: Final = 128
WORKER_BYTES: Final = 64
COUNTER_TABLE_FIXED: Final = 64
COUNTER_ENTRY_BYTES: Final = 64
HISTOGRAM_BYTES: Final = 576
SLOT_BYTES: Final = 384

_STATIC = struct.Struct("<8sI4xQIIddIIII64s")
_HEADER = struct.Struct("<ddQBxHHHHxxIIIQQQII48s48s")
_THREAD = struct.Struct("<BxHIddIIQQdd")
_WORKER = struct.Struct("<HBxIIIQdd")
_COUNTER_FIXED = struct.Struct("<I4xQQ")
_COUNTER_ENTRY = struct.Struct(f"<{COUNTER_NAME_BYTES}sQ")
_HISTOGRAM_FIXED = struct.Struct("<32sI4xQd")
_SLOT = struct.Struct("<QBBBxHHHxxIddQQQQQd48s48s16s56s48s64s")
_CRC = struct.Struct("<I")

# Body sizes (bytes after the 16-byte seqlock prefix) and where histogram arrays sit.
_HEADER_BODY: Final = HEADER_BYTES - _SEQ_BYTES
_THREAD_BODY: Final = THREAD_BYTES - _SEQ_BYTES
_WORKER_BODY: Final = WORKER_BYTES - _SEQ_BYTES
_SLOT_BODY: Final = SLOT_BYTES - _SEQ_BYTES
_HISTOGRAM_BODY: Final = HISTOGRAM_BYTES - _SEQ_BYTES
_HISTOGRAM_BOUNDS_AT: Final = 72 - _SEQ_BYTES  # body-relative
_HISTOGRAM_COUNTS_AT: Final = 312 - _SEQ_BYTES
_HISTOGRAM_MAX_COUNTS: Final = 31

assert _STATIC.size <= STATIC_BYTES
assert _HEADER.size <= _HEADER_BODY
assert _THREAD.size <= _THREAD_BODY
assert _WORKER.size <= _WORKER_BODY
assert _SLOT.size == _SLOT_BODY
assert _HISTOGRAM_FIXED.size <= _HISTOGRAM_BOUNDS_AT
assert _HISTOGRAM_COUNTS_AT == _HISTOGRAM_BOUNDS_AT + 8 * HISTOGRAM_MAX_BOUNDS
assert HISTOGRAM_MAX_BOUNDS + 1 == _HISTOGRAM_MAX_COUNTS
assert 312 + 8 * _HISTOGRAM_MAX_COUNTS <= HISTOGRAM_BYTES
assert len(LATENCY_BUCKETS_MS) <= HISTOGRAM_MAX_BOUNDS

_ZERO_SLOT: Final = bytes(_SLOT_BODY)
_ZERO_THREAD: Final = bytes(_THREAD_BODY)
_EMPTY_ID: Final = bytes(8)
#: A reader's string caches are dropped past this many entries (bounded memory over a long run).
_DECODE_CACHE_ENTRIES: Final = 65536


# -- errors -------------------------------------------------------------------------------------


class StatsError(Exception):
    """The stats block cannot be used; the message says why and what to check."""


class StatsUnavailableError(StatsError):
    """No stats block exists for this instance (the transport is not running, or another instance)."""


class StatsLayoutError(StatsError):
    """The block has another layout version, or is malformed or truncated."""


class StatsWriterGoneError(StatsError):
    """The process that wrote the block is gone, or has not updated it for :data:`STALE_SECONDS`."""


class StatsBusyError(StatsError):
    """A live transport already writes this instance's block."""


# -- layout ---------------------------------------------------------------------------------------


def _aligned(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True, slots=True)
class Layout:
    """Offsets of every region, from :meth:`Capacities.layout`."""

    header: int
    threads: int
    workers: int
    counters: int
    histograms: int
    slots: int
    total: int


@dataclass(frozen=True, slots=True)
class Capacities:
    """Record counts a block is made for; they fix its layout."""

    threads: int
    workers: int
    slots: int
    counters: int = COUNTER_CAPACITY
    histograms: int = len(HISTOGRAM_NAMES)

    def layout(self) -> Layout:
        header = STATIC_BYTES
        threads = header + HEADER_BYTES
        workers = threads + THREAD_BYTES * self.threads
        counters = workers + WORKER_BYTES * self.workers
        histograms = counters + _aligned(COUNTER_TABLE_FIXED + COUNTER_ENTRY_BYTES * self.counters)
        slots = histograms + HISTOGRAM_BYTES * self.histograms
        total = slots + SLOT_BYTES * self.slots
        return Layout(header, threads, workers, counters, histograms, slots, total)

    @classmethod
    def for_settings(cls, settings: Settings) -> Capacities:
        return cls(threads=2 * settings.max_threads, workers=settings.workers, slots=settings.max_connections)


def block_name(instance: str, runtime_dir: str | os.PathLike[str], uid: int | None = None) -> str:
    """``sipwire.<uid>.<instance>.<hash of the runtime dir>``: one block per instance, user and state dir."""
    digest = hashlib.sha256(os.path.abspath(runtime_dir).encode()).hexdigest()[:12]
    return f"sipwire.{os.getuid() if uid is None else uid}.{instance[:64]}.{digest}"


def block_name_for(settings: Settings) -> str:
    return block_name(settings.instance, settings.runtime_dir)


# -- shared memory without resource_tracker surprises ------------------------------------------


def _open_shm(name: str, create: bool = False, size: int = 0) -> SharedMemory:
    """Create or attach ``name`` without leaving it registered with the resource tracker."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name, create=create, size=size, track=False)
    shm = SharedMemory(name, create=create, size=size)
    # Python < 3.13 registers every attach; the tracker would unlink the block when this process exits.
    resource_tracker.unregister("/" + shm.name, "shared_memory")
    return shm


def _unlink_shm(shm: SharedMemory) -> None:
    if sys.version_info < (3, 13):
        # unlink() tells the tracker to forget the name; register first so that message balances.
        resource_tracker.register("/" + shm.name, "shared_memory")
    shm.unlink()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "ignore")


def _field(text: str, size: int) -> bytes:
    return text.encode("utf-8", "replace")[:size]


# -- free lists -----------------------------------------------------------------------------------


class FreeList:
    """Indices 0..capacity-1 handed out lowest first; thread-safe (one short lock per call)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._lock = threading.Lock()
        self.refused = 0  # users that found the list empty

    def take(self, count_refusal: bool = True) -> int:
        """A free index, or -1 when all are in use (counted in :attr:`refused` if ``count_refusal``:
        a caller that retries for the same user counts it once)."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if count_refusal:
                self.refused += 1
            return -1

    def give(self, index: int) -> None:
        with self._lock:
            self._free.append(index)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)


# -- what the writer is given ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderFigures:
    """The dynamic header, as the supervisor computes it."""

    status: int
    threads_wanted: int
    threads_running: int
    workers_wanted: int
    workers_alive: int
    max_connections: int
    connections: int
    slots_used: int
    slots_refused: int
    thread_records_refused: int
    pending_write_bytes: int
    inbox_depth: int
    dispatch_in_flight: int
    listening: Mapping[str, str]


# -- the mapping both sides share -----------------------------------------------------------------


class _Block:
    def __init__(self, shm: SharedMemory, capacities: Capacities) -> None:
        self.shm = shm
        self.name = shm.name
        self.capacities = capacities
        self.layout = capacities.layout()
        buf = shm.buf
        assert buf is not None  # an open SharedMemory always has its buffer
        self._buf: memoryview = buf
        # The seqlock words: one aligned 8-byte load or store each (native 'Q').
        self._words: memoryview = buf.cast("Q")
        # This view pins the mapping: release it at exit too, before SharedMemory.__del__ tries to unmap
        # (else "BufferError: cannot close exported pointers exist" on a reader that never called close()).
        self._release_words = weakref.finalize(self, self._words.release)

    def close(self) -> None:
        """Unmap (our own view first: an exported buffer would keep the mapping alive)."""
        self._release_words()
        self.shm.close()  # releases shm.buf (self._buf) and unmaps

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- writer ---------------------------------------------------------------------------------------


class StatsWriter(_Block):
    """The transport's side. Each record has one writer at a time (see the module docstring)."""

    def __init__(self, shm: SharedMemory, capacities: Capacities) -> None:
        super().__init__(shm, capacities)
        self._counter_index: dict[str, int] = {}
        self._updates = 0
        self._last_figures: HeaderFigures | None = None

    @classmethod
    def create(
        cls,
        name: str,
        capacities: Capacities,
        instance: str,
        histogram_bounds: Sequence[Sequence[float]] = (),
        *,
        pid: int | None = None,
        stale_after: float = STALE_SECONDS,
    ) -> StatsWriter:
        """Make the block, replacing one left by a dead (or long silent) writer.

        Raises :class:`StatsBusyError` if a live writer still updates a block of this name.
        """
        layout = capacities.layout()
        for _ in range(2):
            try:
                shm = _open_shm(name, create=True, size=layout.total)
                break
            except FileExistsError:
                _replace_stale(name, stale_after)
        else:
            raise StatsBusyError(
                f"stats block {name!r} reappeared while replacing a stale one: another transport starting?"
            )
        writer = cls(shm, capacities)
        now_wall, now_mono = time.time(), time.monotonic()
        _STATIC.pack_into(
            writer._buf, 0, b"\0" * 8, LAYOUT_VERSION, layout.total, os.getpid() if pid is None else pid,
            capacities.threads, now_wall, now_mono, capacities.workers, capacities.slots, capacities.counters,
            capacities.histograms, _field(instance, 64),
        )  # fmt: skip
        for index, bounds in enumerate(histogram_bounds):
            writer.write_histogram(index, bounds, [0] * (len(bounds) + 1), 0.0)
        writer._buf[0:8] = MAGIC  # last: a reader that sees the magic sees a whole static header
        return writer

    def mark_stopping(self) -> None:
        self._publish_header_status(STATUS_STOPPING)

    def unlink(self, unmap: bool = True) -> None:
        """Mark the block stopped and remove its name (clean shutdown); readers attached keep their view.

        ``unmap=False`` leaves this process's mapping in place, for a writer thread that may still
        be running (it would fail on an unmapped buffer).
        """
        self._publish_header_status(STATUS_STOPPED)
        _unlink_shm(self.shm)
        if unmap:
            self.close()

    # -- seqlock ---------------------------------------------------------------------------------

    def _publish(self, offset: int, body: bytes | bytearray) -> None:
        """Write one record: odd sequence, CRC and body, even sequence (see "Torn reads")."""
        words = self._words
        index = offset >> 3
        odd = (words[index] + 1) | 1  # from even s: s + 1; from a crashed writer's odd s: s + 2
        words[index] = odd
        _CRC.pack_into(self._buf, offset + 8, crc32(body))
        self._buf[offset + _SEQ_BYTES : offset + _SEQ_BYTES + len(body)] = body
        words[index] = odd + 1

    # -- records ---------------------------------------------------------------------------------

    def write_header(self, figures: HeaderFigures, at: tuple[float, float] | None = None) -> None:
        """The dynamic header; ``at`` (wall, mono) replaces "now" (tests of staleness)."""
        self._updates += 1
        self._last_figures = figures
        listening = figures.listening
        wall, mono = at if at is not None else (time.time(), time.monotonic())
        body = _HEADER.pack(
            wall, mono, self._updates, figures.status, figures.threads_wanted,
            figures.threads_running, figures.workers_wanted, figures.workers_alive, figures.max_connections,
            figures.connections, figures.slots_used, figures.slots_refused, figures.thread_records_refused,
            figures.pending_write_bytes, min(figures.inbox_depth, 0xFFFFFFFF),
            min(figures.dispatch_in_flight, 0xFFFFFFFF),
            _field(listening.get("tcp", ""), 48), _field(listening.get("tls", ""), 48),
        )  # fmt: skip
        self._publish(self.layout.header, body.ljust(_HEADER_BODY, b"\0"))

    def _publish_header_status(self, status: int) -> None:
        figures = self._last_figures or HeaderFigures(status, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, {})
        self.write_header(dataclasses.replace(figures, status=status))

    def write_thread(
        self,
        record: int,
        state: int,
        index: int,
        connections: int,
        load: float,
        loop_lag_ms: float,
        inbox_depth: int,
        in_flight: int,
        jobs: int,
        pending_write_bytes: int,
        heartbeat: float,
        started: float,
    ) -> None:
        body = _THREAD.pack(
            state, index, connections, load, loop_lag_ms, inbox_depth, in_flight, jobs, pending_write_bytes,
            heartbeat, started,
        )  # fmt: skip
        self._publish(self.layout.threads + record * THREAD_BYTES, body.ljust(_THREAD_BODY, b"\0"))

    def clear_thread(self, record: int) -> None:
        self._publish(self.layout.threads + record * THREAD_BYTES, _ZERO_THREAD)

    def write_worker(
        self,
        index: int,
        pid: int,
        alive: bool,
        in_flight: int,
        done: int,
        restarts: int,
        heartbeat: float,
        started: float,
    ) -> None:
        body = _WORKER.pack(index, alive, pid, min(in_flight, 0xFFFFFFFF), restarts, done, heartbeat, started)
        self._publish(self.layout.workers + index * WORKER_BYTES, body.ljust(_WORKER_BODY, b"\0"))

    def write_counters(self, counters: Mapping[str, int]) -> None:
        """The whole table in one record; a name keeps its entry for the block's lifetime."""
        capacity = self.capacities.counters
        positions = self._counter_index
        values = [0] * len(positions)
        dropped_names = dropped_value = 0
        for name, value in counters.items():
            position = positions.get(name)
            if position is None:
                if len(positions) >= capacity or len(name.encode()) > COUNTER_NAME_BYTES:
                    dropped_names += 1
                    dropped_value += value
                    continue
                position = positions[name] = len(positions)
                values.append(0)
            values[position] = value
        table = bytearray(COUNTER_TABLE_FIXED - _SEQ_BYTES + COUNTER_ENTRY_BYTES * len(positions))
        _COUNTER_FIXED.pack_into(table, 0, len(positions), dropped_names, dropped_value)
        at = COUNTER_TABLE_FIXED - _SEQ_BYTES
        for name, position in positions.items():
            _COUNTER_ENTRY.pack_into(table, at + position * COUNTER_ENTRY_BYTES, name.encode(), values[position])
        self._publish(self.layout.counters, table)

    def write_histogram(self, index: int, bounds: Sequence[float], counts: Sequence[int], sum_ms: float) -> None:
        if len(bounds) > HISTOGRAM_MAX_BOUNDS or len(counts) != len(bounds) + 1:
            raise ValueError(f"histogram {index}: {len(bounds)} bounds and {len(counts)} counts do not fit")
        body = bytearray(_HISTOGRAM_BODY)
        _HISTOGRAM_FIXED.pack_into(body, 0, HISTOGRAM_NAMES[index].encode(), len(bounds), sum(counts), sum_ms)
        struct.pack_into(f"<{len(bounds)}d", body, _HISTOGRAM_BOUNDS_AT, *bounds)
        struct.pack_into(f"<{len(counts)}Q", body, _HISTOGRAM_COUNTS_AT, *counts)
        self._publish(self.layout.histograms + index * HISTOGRAM_BYTES, body)

    def write_connection(self, slot: int, conn: Connection, thread: int) -> None:
        """One connection's slot, from its owning thread."""
        tls = conn.tls
        local = conn.local
        remote = conn.remote
        body = _SLOT.pack(
            conn.id, STATE_CODES.get(conn.state.value, 0), TRANSPORT_CODES.get(conn.transport, 0),
            1 if conn.outbound else 0, thread, local[1], remote[1], min(conn.in_flight, 0xFFFFFFFF), conn.created,
            conn.last_activity, conn.bytes_in, conn.bytes_out, conn.messages_in, conn.messages_out,
            conn.queued_total - conn.sent_total, tls.handshake_ms if tls else 0.0, local[0].encode(),
            remote[0].encode(), tls.version.encode() if tls else b"", tls.cipher.encode() if tls else b"",
            tls.server_name.encode("utf-8", "replace")[:48] if tls else b"",
            tls.peer_subject.encode("utf-8", "replace")[:64] if tls else b"",
        )  # fmt: skip
        self._publish(self.layout.slots + slot * SLOT_BYTES, body)

    def write_slot_fields(self, slot: int, fields: Sequence[Any]) -> None:
        """A slot from raw field values in :data:`_SLOT` order (tests and benchmarks)."""
        self._publish(self.layout.slots + slot * SLOT_BYTES, _SLOT.pack(*fields))

    def clear_slot(self, slot: int) -> None:
        self._publish(self.layout.slots + slot * SLOT_BYTES, _ZERO_SLOT)


def remove_stale_block(name: str, stale_after: float = STALE_SECONDS) -> bool:
    """Remove block ``name`` if no live writer updates it (a transport killed with SIGKILL leaves one).

    Returns whether a block was removed; raises :class:`StatsBusyError` if its writer is alive.
    """
    try:
        _open_shm(name).close()
    except FileNotFoundError:
        return False
    _replace_stale(name, stale_after)
    return True


def _replace_stale(name: str, stale_after: float) -> None:
    """Unlink the existing block ``name`` unless a live writer still updates it."""
    try:
        reader = StatsReader.open(name)
    except StatsUnavailableError:
        return  # gone meanwhile: create again
    except StatsLayoutError:
        pid, heartbeat = 0, 0.0  # half-made, or another layout: its pid cannot be trusted
    else:
        try:
            header = reader.header()
        finally:
            reader.close()
        pid = header.writer_pid
        heartbeat = header.updated_mono if header.updates else header.started_mono
        if header.status == "stopped":
            pid = 0
    if pid and pid_alive(pid) and time.monotonic() - heartbeat < stale_after:
        raise StatsBusyError(
            f"stats block {name!r} is written by a live transport (pid {pid}): "
            "stop it first, or run this one with another --instance or --state-dir"
        )
    try:
        stale = _open_shm(name)
    except FileNotFoundError:
        return
    stale.close()
    _unlink_shm(stale)


# -- reader ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """The static and dynamic header, plus what the reader concluded about the writer."""

    name: str
    instance: str
    layout_version: int
    writer_pid: int
    started_wall: float
    started_mono: float
    capacities: Capacities
    updated_wall: float
    updated_mono: float
    updates: int
    status: str
    threads_wanted: int
    threads_running: int
    workers_wanted: int
    workers_alive: int
    max_connections: int
    connections: int
    slots_used: int
    slots_refused: int
    thread_records_refused: int
    pending_write_bytes: int
    inbox_depth: int
    dispatch_in_flight: int
    listening: dict[str, str]
    writer_alive: bool
    age: float  # seconds since the last update (since the start if none yet)

    @property
    def stale(self) -> bool:
        return self.age > STALE_SECONDS

    @property
    def live(self) -> bool:
        return self.writer_alive and not self.stale and self.status != "stopped"


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    record: int
    state: str
    index: int
    connections: int
    load: float
    loop_lag_ms: float
    inbox_depth: int
    in_flight: int
    jobs: int
    pending_write_bytes: int
    heartbeat: float
    started: float


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    index: int
    pid: int
    alive: bool
    in_flight: int
    done: int
    restarts: int
    heartbeat: float
    started: float


class ConnectionRecord(NamedTuple):
    """One used slot. A named tuple, not a dataclass: a snapshot builds one per connection, and
    tuple construction is several times cheaper (10,000 slots in well under 50 ms)."""

    slot: int
    id: int
    state: str
    transport: str
    outbound: bool
    thread: int
    local: str
    remote: str
    in_flight: int
    created: float
    last_activity: float
    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int
    pending_write_bytes: int
    tls_handshake_ms: float
    tls_version: str
    tls_cipher: str
    tls_server_name: str
    tls_peer_subject: str


@dataclass(frozen=True, slots=True)
class Counters:
    values: dict[str, int]
    dropped_names: int
    dropped_value: int


@dataclass(frozen=True, slots=True)
class Histogram:
    name: str
    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # len(bounds) + 1, the last one +Inf; not cumulative
    count: int
    sum_ms: float


@dataclass(slots=True)
class ReadCounts:
    """How hard reading was: seqlock retries, CRC mismatches after a stable sequence, records given up on."""

    retries: int = 0
    crc_failures: int = 0
    unreadable: int = 0


class _Texts(dict[bytes, str]):
    """Decoded NUL-padded fields by their raw bytes; a miss decodes and remembers."""

    def __missing__(self, raw: bytes) -> str:
        if len(self) > _DECODE_CACHE_ENTRIES:
            self.clear()
        self[raw] = text = _text(raw)
        return text


class _Hosts(dict[bytes, str]):
    """Hosts as shown in an address: IPv6 in brackets."""

    def __missing__(self, raw: bytes) -> str:
        if len(self) > _DECODE_CACHE_ENTRIES:
            self.clear()
        text = _text(raw)
        self[raw] = shown = f"[{text}]" if ":" in text else text
        return shown


def _fixed_covered(length: int) -> Callable[[bytes], int]:
    return lambda _body: length


def _counters_covered(capacity: int) -> Callable[[bytes], int]:
    def covered(body: bytes) -> int:
        (used,) = struct.unpack_from("<I", body, 0)
        return -1 if used > capacity else COUNTER_TABLE_FIXED - _SEQ_BYTES + used * COUNTER_ENTRY_BYTES

    return covered


class StatsReader(_Block):
    """A tool's side: attach, read plain records; never blocks the writer, never sees a torn record."""

    def __init__(self, shm: SharedMemory, capacities: Capacities, instance: str) -> None:
        super().__init__(shm, capacities)
        self.instance = instance
        self.counts = ReadCounts()
        # Decoded strings by their raw field bytes: hosts and TLS names repeat across slots and snapshots.
        self._texts = _Texts()
        self._hosts = _Hosts()

    @classmethod
    def open(cls, name: str) -> StatsReader:
        """Attach the block ``name``; raises :class:`StatsUnavailableError` or :class:`StatsLayoutError`."""
        try:
            shm = _open_shm(name)
        except FileNotFoundError:
            raise StatsUnavailableError(
                f"no stats block {name!r}: is the transport running, with this --instance and --state-dir?"
            ) from None
        try:
            capacities, instance = _check_static(shm)
        except StatsError:
            shm.close()
            raise
        return cls(shm, capacities, instance)

    @classmethod
    def for_settings(cls, settings: Settings) -> StatsReader:
        return cls.open(block_name_for(settings))

    # -- seqlock reads ---------------------------------------------------------------------------

    def _read(self, offset: int, size: int, covered: Callable[[bytes], int]) -> bytes | None:
        """The body of the record at ``offset`` (``size`` bytes in all), or None if never written.

        Raises nothing on contention: after :data:`READ_ATTEMPTS` the record counts as
        unreadable and None is returned too.
        """
        words = self._words
        buf = self._buf
        index = offset >> 3
        counts = self.counts
        for attempt in range(READ_ATTEMPTS):
            first = words[index]
            if first == 0:
                return None
            if not first & 1:
                raw = bytes(buf[offset + 8 : offset + size])
                if words[index] == first:
                    body = raw[8:]
                    length = covered(body)
                    if 0 <= length <= len(body) and crc32(memoryview(body)[:length]) == _CRC.unpack_from(raw, 0)[0]:
                        return body
                    counts.crc_failures += 1
            counts.retries += 1
            if attempt >= SPIN_ATTEMPTS:
                time.sleep(RETRY_SLEEP_SECONDS)
        counts.unreadable += 1
        return None

    # -- snapshots -------------------------------------------------------------------------------

    def header(self) -> BlockHeader:
        buf = self._buf
        static = _STATIC.unpack_from(buf, 0)
        pid, started_wall, started_mono = int(static[3]), float(static[5]), float(static[6])
        body = self._read(self.layout.header, HEADER_BYTES, _fixed_covered(_HEADER_BODY))
        now = time.monotonic()
        if body is None:
            values: tuple[Any, ...] = (0.0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b"", b"")
        else:
            values = _HEADER.unpack_from(body, 0)
        (
            updated_wall, updated_mono, updates, status, threads_wanted, threads_running, workers_wanted,
            workers_alive, max_connections, connections, slots_used, slots_refused, thread_records_refused,
            pending, inbox, in_flight, tcp, tls,
        ) = values  # fmt: skip
        listening = {name: _text(raw) for name, raw in (("tcp", tcp), ("tls", tls)) if _text(raw)}
        return BlockHeader(
            name=self.name, instance=self.instance, layout_version=LAYOUT_VERSION, writer_pid=pid,
            started_wall=started_wall, started_mono=started_mono, capacities=self.capacities,
            updated_wall=updated_wall, updated_mono=updated_mono, updates=updates,
            status=STATUS_NAMES.get(status, f"unknown({status})"), threads_wanted=threads_wanted,
            threads_running=threads_running, workers_wanted=workers_wanted, workers_alive=workers_alive,
            max_connections=max_connections, connections=connections, slots_used=slots_used,
            slots_refused=slots_refused, thread_records_refused=thread_records_refused, pending_write_bytes=pending,
            inbox_depth=inbox, dispatch_in_flight=in_flight, listening=listening, writer_alive=pid_alive(pid),
            age=round(now - (updated_mono if updates else started_mono), 3),
        )  # fmt: skip

    def require_live(self, allow_stale: bool = False) -> BlockHeader:
        """The header, or :class:`StatsWriterGoneError` if its writer died, stopped or (unless
        ``allow_stale``) went silent for more than :data:`STALE_SECONDS`."""
        header = self.header()
        if not header.writer_alive or header.status == "stopped":
            raise StatsWriterGoneError(
                f"the transport (pid {header.writer_pid}) that wrote stats block {self.name!r} is gone; "
                f"its last update is {header.age:.1f}s old"
            )
        if header.stale and not allow_stale:
            raise StatsWriterGoneError(
                f"the transport (pid {header.writer_pid}) has not updated stats block {self.name!r} "
                f"for {header.age:.1f}s (more than {STALE_SECONDS}s): it is stuck or stopped"
            )
        return header

    def threads(self, include_retiring: bool = False) -> list[ThreadRecord]:
        """Thread records in use, active ones by pool index (retiring ones after them if asked)."""
        records: list[ThreadRecord] = []
        base = self.layout.threads
        covered = _fixed_covered(_THREAD_BODY)
        for record in range(self.capacities.threads):
            body = self._read(base + record * THREAD_BYTES, THREAD_BYTES, covered)
            if body is None:
                continue
            fields = _THREAD.unpack_from(body, 0)
            state = fields[0]
            if state == THREAD_UNUSED or (state != THREAD_ACTIVE and not include_retiring):
                continue
            records.append(ThreadRecord(record, THREAD_STATE_NAMES.get(state, f"unknown({state})"), *fields[1:]))
        records.sort(key=lambda r: (r.state != "active", r.index, r.record))
        return records

    def workers(self) -> list[WorkerRecord]:
        records: list[WorkerRecord] = []
        base = self.layout.workers
        covered = _fixed_covered(_WORKER_BODY)
        for index in range(self.capacities.workers):
            body = self._read(base + index * WORKER_BYTES, WORKER_BYTES, covered)
            if body is None:
                continue
            number, alive, pid, in_flight, restarts, done, heartbeat, started = _WORKER.unpack_from(body, 0)
            records.append(WorkerRecord(number, pid, bool(alive), in_flight, done, restarts, heartbeat, started))
        return records

    def counters(self) -> Counters:
        capacity = self.capacities.counters
        size = COUNTER_TABLE_FIXED + COUNTER_ENTRY_BYTES * capacity
        body = self._read(self.layout.counters, size, _counters_covered(capacity))
        if body is None:
            return Counters({}, 0, 0)
        used, dropped_names, dropped_value = _COUNTER_FIXED.unpack_from(body, 0)
        values: dict[str, int] = {}
        at = COUNTER_TABLE_FIXED - _SEQ_BYTES
        for position in range(used):
            name, value = _COUNTER_ENTRY.unpack_from(body, at + position * COUNTER_ENTRY_BYTES)
            values[_text(name)] = value
        return Counters(values, dropped_names, dropped_value)

    def histograms(self) -> dict[str, Histogram]:
        result: dict[str, Histogram] = {}
        base = self.layout.histograms
        covered = _fixed_covered(_HISTOGRAM_BODY)
        for index in range(self.capacities.histograms):
            body = self._read(base + index * HISTOGRAM_BYTES, HISTOGRAM_BYTES, covered)
            if body is None:
                continue
            name_raw, used, count, sum_ms = _HISTOGRAM_FIXED.unpack_from(body, 0)
            if used > HISTOGRAM_MAX_BOUNDS:
                self.counts.unreadable += 1
                continue
            bounds = struct.unpack_from(f"<{used}d", body, _HISTOGRAM_BOUNDS_AT)
            counts = struct.unpack_from(f"<{used + 1}Q", body, _HISTOGRAM_COUNTS_AT)
            name = _text(name_raw)
            result[name] = Histogram(name, bounds, counts, count, sum_ms)
        return result

    def connections(self) -> list[ConnectionRecord]:
        """Every used slot, whole region at once; slots that moved while copied are re-read alone."""
        capacity = self.capacities.slots
        if not capacity:
            return []
        base = self.layout.slots
        words = self._words
        first_word = base >> 3
        step = SLOT_BYTES >> 3
        end_word = first_word + capacity * step
        before = words[first_word:end_word:step].tolist()
        data = bytes(self._buf[base : base + capacity * SLOT_BYTES])
        after = words[first_word:end_word:step].tolist()
        view = memoryview(data)
        unpack = _SLOT.unpack_from
        crc_of = _CRC.unpack_from
        records: list[ConnectionRecord] = []
        append = records.append
        decode = self._decode_slot
        covered = _fixed_covered(_SLOT_BODY)
        for slot in range(capacity):
            sequence = before[slot]
            if not sequence:
                continue  # never written
            at = slot * SLOT_BYTES
            if sequence == after[slot] and not sequence & 1:
                if data[at + 16 : at + 24] == _EMPTY_ID:
                    continue  # free
                if crc32(view[at + 16 : at + SLOT_BYTES]) == crc_of(data, at + 8)[0]:
                    append(decode(slot, unpack(data, at + 16)))
                    continue
                self.counts.crc_failures += 1
            else:
                self.counts.retries += 1
            body = self._read(base + at, SLOT_BYTES, covered)
            if body is not None and body[0:8] != _EMPTY_ID:
                append(decode(slot, unpack(body, 0)))
        return records

    def _decode_slot(self, slot: int, fields: tuple[Any, ...]) -> ConnectionRecord:
        (
            conn_id, state, transport, flags, thread, local_port, remote_port, in_flight, created, last_activity,
            bytes_in, bytes_out, messages_in, messages_out, pending, handshake_ms, local_host, remote_host,
            tls_version, tls_cipher, server_name, peer_subject,
        ) = fields  # fmt: skip
        hosts = self._hosts
        texts = self._texts
        return ConnectionRecord(
            slot, conn_id, STATE_NAMES.get(state, "unknown"), TRANSPORT_NAMES.get(transport, "unknown"),
            bool(flags & 1), thread, f"{hosts[local_host]}:{local_port}", f"{hosts[remote_host]}:{remote_port}",
            in_flight, created, last_activity, bytes_in, bytes_out, messages_in, messages_out, pending, handshake_ms,
            texts[tls_version], texts[tls_cipher], texts[server_name], texts[peer_subject],
        )  # fmt: skip

    # -- waiting ---------------------------------------------------------------------------------

    def wait_fresh(self, since: float, timeout: float) -> bool:
        """Wait until the supervisor and every active thread wrote after ``since`` (mono); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            header = self.header()
            if header.updates and header.updated_mono >= since:
                threads = self.threads()
                if all(t.heartbeat >= since for t in threads):
                    return True
            if time.monotonic() >= deadline or not header.writer_alive or header.status == "stopped":
                return False
            time.sleep(0.01)


def _check_static(shm: SharedMemory) -> tuple[Capacities, str]:
    """Validate the static header against this module's layout; bounds first."""
    name = shm.name
    if shm.size < STATIC_BYTES:
        raise StatsLayoutError(f"stats block {name!r} is {shm.size} bytes: too small to be one")
    buf = shm.buf  # SharedMemory's own view: shm.close() releases it
    assert buf is not None
    magic = bytes(buf[0:8])
    if magic != MAGIC:
        raise StatsLayoutError(
            f"stats block {name!r} has no valid magic ({magic!r}): it is still being created, or is not ours"
        )
    _, version, total, _, threads, _, _, workers, slots, counters, histograms, instance = _STATIC.unpack_from(buf, 0)
    if version != LAYOUT_VERSION:
        raise StatsLayoutError(
            f"stats block {name!r} has layout version {version}, this reader understands {LAYOUT_VERSION}: "
            "run the sipwire that matches the running transport"
        )
    capacities = Capacities(threads, workers, slots, counters, histograms)
    for field_name, limit in _MAX_CAPACITY.items():
        if not 0 <= getattr(capacities, field_name) <= limit:
            raise StatsLayoutError(f"stats block {name!r}: {field_name} capacity {getattr(capacities, field_name)}")
    if histograms > len(HISTOGRAM_NAMES):
        raise StatsLayoutError(f"stats block {name!r}: {histograms} histograms, layout has {len(HISTOGRAM_NAMES)}")
    expected = capacities.layout().total
    if total != expected or shm.size < expected:
        raise StatsLayoutError(
            f"stats block {name!r} is {shm.size} bytes, header says {total}, layout needs {expected}: truncated"
        )
    return capacities, _text(instance)


# -- views in the control socket's JSON shape -------------------------------------------------------


def histogram_view(histogram: Histogram) -> dict[str, Any]:
    """Cumulative buckets (Prometheus style), percentiles read off their upper bounds, sum."""
    total = sum(histogram.counts)
    cumulative: list[dict[str, Any]] = []
    running = 0
    for bound, count in zip((*histogram.bounds, "+Inf"), histogram.counts, strict=True):
        running += count
        cumulative.append({"le": bound, "count": running})
    percentiles: dict[str, Any] = {}
    for label, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        rank = fraction * total
        percentiles[label] = next((b["le"] for b in cumulative if total and b["count"] >= rank), None)
    return {"count": total, "sum_ms": round(histogram.sum_ms, 3), "buckets": cumulative, **percentiles}


def stats_view(reader: StatsReader) -> dict[str, Any]:
    """What ``sipwire ctl stats --json`` prints: the control socket's ``stats`` shape, read from the block."""
    header = reader.header()
    now = time.monotonic()
    threads = reader.threads()
    workers = reader.workers()
    counters = reader.counters()
    histograms = reader.histograms()
    empty = Histogram("", (), (0,), 0, 0.0)
    return {
        "connections": header.connections,
        "max_connections": header.max_connections,
        "pending_write_bytes": header.pending_write_bytes,
        "inbox_depth": header.inbox_depth,
        "dispatch_in_flight": header.dispatch_in_flight,
        "counters": dict(sorted(counters.values.items())),
        "counters_left_out": {"names": counters.dropped_names, "value": counters.dropped_value},
        **{name: histogram_view(histograms.get(name, empty)) for name in HISTOGRAM_NAMES},
        "workers": [
            {
                "index": w.index,
                "pid": w.pid,
                "alive": w.alive,
                "restarts": w.restarts,
                "uptime": round(now - w.started, 3) if w.started else 0.0,
                "in_flight": w.in_flight,
                "done": w.done,
                "heartbeat_age": round(now - w.heartbeat, 3) if w.heartbeat else None,
            }
            for w in workers
        ],
        "threads": [
            {
                "index": t.index,
                "connections": t.connections,
                "load": round(t.load, 4),
                "queue_depth": t.inbox_depth,
                "jobs": t.jobs,
                "loop_lag_ms": round(t.loop_lag_ms, 3),
                "pending_write_bytes": t.pending_write_bytes,
                "in_flight": t.in_flight,
                "heartbeat_age": round(now - t.heartbeat, 3),
            }
            for t in threads
        ],
        "block": block_view(header, reader),
    }


def block_view(header: BlockHeader, reader: StatsReader) -> dict[str, Any]:
    return {
        "name": header.name,
        "layout_version": header.layout_version,
        "writer_pid": header.writer_pid,
        "writer_alive": header.writer_alive,
        "status": header.status,
        "updated_age": header.age,
        "stale": header.stale,
        "threads_wanted": header.threads_wanted,
        "threads_running": header.threads_running,
        "slots_used": header.slots_used,
        "slot_capacity": header.capacities.slots,
        "slots_refused": header.slots_refused,
        "thread_records_refused": header.thread_records_refused,
        "read_retries": reader.counts.retries,
        "unreadable_records": reader.counts.unreadable,
    }


def connection_view(record: ConnectionRecord, now: float) -> dict[str, Any]:
    """One connection in the control socket's ``connections`` shape (TLS name and subject cut to fit a slot)."""
    return {
        "id": record.id,
        "state": record.state,
        "transport": record.transport,
        "local": record.local,
        "remote": record.remote,
        "thread": record.thread,
        "outbound": record.outbound,
        "age": round(now - record.created, 3),
        "idle": round(now - record.last_activity, 3),
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "messages_in": record.messages_in,
        "messages_out": record.messages_out,
        "pending_write_bytes": record.pending_write_bytes,
        "in_flight": record.in_flight,
        "tls_version": record.tls_version,
        "tls_cipher": record.tls_cipher,
        "tls_handshake_ms": record.tls_handshake_ms,
        "tls_server_name": record.tls_server_name,
        "tls_peer_subject": record.tls_peer_subject,
    }


def connections_view(
    records: Iterable[ConnectionRecord], state: str | None = None, transport: str | None = None, limit: int = 1000
) -> dict[str, Any]:
    """``{"total", "connections"}`` sorted by id, filtered like the control socket's ``connections``."""
    now = time.monotonic()
    selected = [
        r for r in records if (state is None or r.state == state) and (transport is None or r.transport == transport)
    ]
    selected.sort(key=lambda r: r.id)
    return {"total": len(selected), "connections": [connection_view(r, now) for r in selected[:limit]]}
