"""The stats block's byte layout: offsets, record formats, capacities, and the rules both sides keep.

One block per instance, a POSIX shared-memory segment named by
:func:`.shm.block_name`; :mod:`.writer` fills it in the transport process,
:mod:`.reader` reads it from tools and the console. This module is the
contract between them: change the layout, bump :data:`LAYOUT_VERSION`.

Who writes what (one writer per record at any time, never a lock):

* the supervisor loop: the dynamic header, worker records, the counter
  table and the histograms, every :data:`SUPERVISOR_INTERVAL_SECONDS`;
* each I/O thread, on its timer tick: its own thread record, and the
  slots of the connections it owns that changed since it last wrote them.
  A connection takes a slot from a free list (:class:`.writer.FreeList`, in the
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
    256                        384                       dynamic header record
    640                        128 * thread_records      I/O thread records
    ...                        64 * worker_records       worker records
    ...                        64 + 64 * counter_cap     counter table (one record)
    ...                        576 * 7                   histograms (one record each)
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

Dynamic header record (384 bytes; body covered: 16..384)::

    16   8  f64 last update, wall          24   8  f64 last update, mono (the supervisor's heartbeat)
    32   8  u64 updates written            40   1  u8 status: 1 running, 2 stopping, 3 stopped
    41   1  reserved                       42   2  u16 I/O threads wanted
    44   2  u16 I/O threads running        46   2  u16 workers wanted
    48   2  u16 workers alive              50   2  reserved
    52   4  u32 max_connections            56   4  u32 open connections (owner registry)
    60   4  u32 slots in use               64   8  u64 connections that found no free slot
    72   8  u64 threads that found no free thread record
    80   8  u64 pending write bytes        88   4  u32 queue depth: inbox jobs waiting, all threads
    92   4  u32 messages dispatched, not yet done
    96   48 str TCP listening address      144  48 str TLS listening address (empty: none)
    192  48 str WS listening address       240  48 str WSS listening address (empty: none)
    288  96 reserved

I/O thread record (128 bytes; body covered: 16..128)::

    16   1  u8 state: 0 unused, 1 active, 2 retiring (draining after a shrink)
    17   1  reserved                       18   2  u16 pool index
    20   4  u32 connections owned          24   8  f64 busy ratio over the last full second (0..1)
    32   8  f64 loop lag, ms               40   4  u32 queue depth: inbox jobs waiting
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
``dispatch_latency_ms`` and ``write_latency_ms`` (both :data:`LATENCY_BUCKETS_MS`),
``ws_handshake_ms`` (WebSocket upgrades, from accept or the end of TLS: :data:`HANDSHAKE_BUCKETS_MS`),
then the message stages ``read_framed_ms``, ``queue_wait_ms`` and ``routing_ms``
(:data:`LATENCY_BUCKETS_MS`; what each times: :mod:`sipwire.transport.stages`).
The bounds are written into the record, so a reader needs no copy of them::

    16   32 str name                       48   4  u32 n: bounds used (n <= 30)
    52   4  reserved                       56   8  u64 observations
    64   8  f64 sum of observations, ms
    72   240 f64[30] upper bounds, ms (n used, ascending)
    312  248 u64[31] bucket counts, not cumulative (n + 1 used: the last one is +Inf)
    560  16 reserved

Connection slot (384 bytes; body covered: 16..384; a free slot has id 0)::

    16   8  u64 connection id (0: free)    24   1  u8 state: 1 connecting, 2 handshake, 3 open, 4 closing
    25   1  u8 transport: 1 tcp, 2 tls,    26   1  u8 flags: bit 0 outbound
             3 ws, 4 wss
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
sequence and is retried (at most :data:`.reader.READ_ATTEMPTS` times, sleeping a
little after the first few, then the record is reported unreadable rather
than waited for). Python offers no memory barriers, so on weakly ordered
CPUs (ARM) the sequence check alone could let a torn copy through; the
CRC-32 over each body catches that case too (such a copy is counted in
:attr:`.reader.ReadCounts.crc_failures` and retried), and tests use it to prove
every record they read is whole. Whole-region reads (all connection
slots) load every sequence first, copy the region once, load them again,
and re-read only the slots whose sequence moved.

Liveness: the writer's pid is in the static header and the supervisor's
heartbeat in the dynamic one; readers flag a block whose pid is gone or
whose heartbeat is older than :data:`STALE_SECONDS`
(:class:`.reader.BlockHeader`) and :meth:`.reader.StatsReader.require_live`
turns that into :class:`.reader.StatsWriterGoneError`. A clean shutdown
marks the block stopped and unlinks it; a new writer replaces the block
of a dead one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sipwire.transport.stages import LATENCY_BUCKETS_MS

if TYPE_CHECKING:
    from sipwire.config import Settings

MAGIC: Final = b"SIPWSTAT"
#: Bump on any change of the layout above; readers refuse other versions.
#: 2: the WS and WSS listening addresses in a 384-byte dynamic header; transport codes 3 ws, 4 wss;
#: a fourth histogram, ws_handshake_ms.
#: 3: seven histograms (the message stages read_framed_ms, queue_wait_ms, routing_ms), latency buckets from 5 µs.
LAYOUT_VERSION: Final = 3

#: How often the supervisor rewrites the header, workers, counters and histograms.
SUPERVISOR_INTERVAL_SECONDS: Final = 0.25
#: A writer whose heartbeat is older than this is reported stale (it writes 4 times a second).
STALE_SECONDS: Final = 5.0

#: Upper bounds (ms) of the TLS handshake duration histogram; one more bucket counts the rest.
HANDSHAKE_BUCKETS_MS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)
#: The histogram records, in block order, and the bounds of each.
HISTOGRAMS: Final = {
    "tls_handshake_ms": HANDSHAKE_BUCKETS_MS,
    "dispatch_latency_ms": LATENCY_BUCKETS_MS,
    "write_latency_ms": LATENCY_BUCKETS_MS,
    "ws_handshake_ms": HANDSHAKE_BUCKETS_MS,
    "read_framed_ms": LATENCY_BUCKETS_MS,
    "queue_wait_ms": LATENCY_BUCKETS_MS,
    "routing_ms": LATENCY_BUCKETS_MS,
}
HISTOGRAM_NAMES: Final = tuple(HISTOGRAMS)
HISTOGRAM_TLS, HISTOGRAM_WS = HISTOGRAM_NAMES.index("tls_handshake_ms"), HISTOGRAM_NAMES.index("ws_handshake_ms")
#: The histograms the supervisor sums from the I/O threads' :class:`~sipwire.transport.stages.LatencyHistogram`.
LATENCY_HISTOGRAMS: Final = tuple(name for name, bounds in HISTOGRAMS.items() if bounds is LATENCY_BUCKETS_MS)

STATUS_RUNNING, STATUS_STOPPING, STATUS_STOPPED = 1, 2, 3
STATUS_NAMES: Final = {0: "starting", STATUS_RUNNING: "running", STATUS_STOPPING: "stopping", STATUS_STOPPED: "stopped"}
THREAD_UNUSED, THREAD_ACTIVE, THREAD_RETIRING = 0, 1, 2
THREAD_STATE_NAMES: Final = {THREAD_ACTIVE: "active", THREAD_RETIRING: "retiring"}
STATE_CODES: Final = {"connecting": 1, "handshake": 2, "open": 3, "closing": 4}
STATE_NAMES: Final = {code: name for name, code in STATE_CODES.items()}
TRANSPORT_CODES: Final = {"tcp": 1, "tls": 2, "ws": 3, "wss": 4}
TRANSPORT_NAMES: Final = {code: name for name, code in TRANSPORT_CODES.items()}

#: Counter capacity: sipwire has a few dozen names today (``framing_error.<reason>``,
#: ``write.<result>``...); four times that leaves room, and overflow is counted.
COUNTER_CAPACITY: Final = 256
COUNTER_NAME_BYTES: Final = 56
HISTOGRAM_MAX_BOUNDS: Final = 30

_ALIGN: Final = 64
_SEQ_BYTES: Final = 16  # sequence, CRC, reserved
STATIC_BYTES: Final = 256
HEADER_BYTES: Final = 384
THREAD_BYTES: Final = 128
WORKER_BYTES: Final = 64
COUNTER_TABLE_FIXED: Final = 64
COUNTER_ENTRY_BYTES: Final = 64
HISTOGRAM_BYTES: Final = 576
SLOT_BYTES: Final = 384

_STATIC = struct.Struct("<8sI4xQIIddIIII64s")
_HEADER = struct.Struct("<ddQBxHHHHxxIIIQQQII48s48s48s48s")
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
assert len(HANDSHAKE_BUCKETS_MS) <= HISTOGRAM_MAX_BOUNDS


# -- regions --------------------------------------------------------------------------------------


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


# -- strings in fixed-size fields -----------------------------------------------------------------


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "ignore")


def _field(text: str, size: int) -> bytes:
    return text.encode("utf-8", "replace")[:size]
