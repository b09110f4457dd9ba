"""The capture ring: the SIP messages the transport carried, in and out, for the console's call-flow view.

The I/O threads only append references here; nothing is parsed, copied or
formatted on the data path. A received message is kept as the MESSAGE record
the I/O thread built for its worker anyway (connection prefix, receive time,
trace context, raw message: :mod:`transport.wire`), so a read costs one
``extend`` of the records it framed. A message sent is kept as a tuple of the
connection's prefix (built once per connection), the time, the trace id of its
write job and the payload; on WS and WSS the SIP text, not the frame.

The ring is bounded in bytes (``capture_bytes``: message bytes, plus per
entry its overhead and its summary's, :func:`charge`); past it, the oldest entries go first,
down to 15/16 of it or :data:`EVICT_STEP_BYTES` below it, and are counted.
Several I/O threads append and the control thread reads, so the deque and
its byte count change under one lock, held for an append, a bounded eviction
or a copy of some references: never while anything is decoded or freed. Entries are numbered
in the order they were appended (``seq``), which is the order the transport
carried them; :meth:`CaptureRing.entries` gives the entries from a number on,
and :func:`decode` turns one into a :class:`Captured`, for :mod:`transport.capturequery`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sipwire.otel.recorder import WriteTrace, parse_traceparent
from sipwire.transport.wire import MessageRecord, RecordReader, decode_prefix

#: What one entry costs beyond its message bytes, measured with tracemalloc on CPython 3.11, so that a
#: flood of tiny messages cannot hold more memory than ``capture_bytes`` says. A received entry is its
#: MESSAGE record (a bytes header and a deque slot); a sent one is a tuple, its time, its trace id and its
#: payload's header (184 with a trace id, 140 without). Plus :data:`SUMMARY_BYTES`, for its summary.
RECEIVED_OVERHEAD_BYTES: Final = 48
SENT_OVERHEAD_BYTES: Final = 184
#: What the summary of an entry (:mod:`transport.capturequery`) costs, counted in the ring's bound from the
#: start since a console may ask at any time: measured 524 bytes per message of OPTIONS exchanges (two
#: messages a Call-ID), less in longer dialogs, about 820 when every message has a Call-ID of its own,
#: the case this figure covers (tests/test_capture.py checks the bound with tracemalloc).
SUMMARY_BYTES: Final = 850

#: A full ring is cut down to this many sixteenths of its capacity (the ring holds 15/16 to 16/16 of it)...
EVICT_TO_SIXTEENTHS: Final = 15
#: ...but one eviction frees at most this much beyond what the append brought, so an append never holds
#: the lock the other I/O threads append under for more than a few microseconds (1/16 of 1 GiB is 64 MiB).
EVICT_STEP_BYTES: Final = 256 << 10

#: An outbound entry: (connection prefix, wall time queued, trace id or 0, SIP payload).
Outbound = tuple[bytes, float, int, bytes]


@dataclass(frozen=True, slots=True)
class Captured:
    """One carried message, decoded from its entry (off the data path)."""

    seq: int
    time: float
    direction: str  # "in" (received) or "out" (queued for sending)
    conn_id: int
    transport: str
    local: tuple[str, int]
    remote: tuple[str, int]
    trace_id: str  # 32 hex digits, "" when the message was not traced
    raw: bytes


class CaptureRing:
    """Bounded, thread-safe ring of carried messages; see the module docstring."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: deque[bytes | Outbound] = deque()
        self._lock = threading.Lock()
        self._bytes = 0
        self._appended = 0  # entries ever appended: the next entry's seq
        self._evicted = 0

    # -- the data path: I/O threads --------------------------------------------------------------

    def received(self, records: list[bytes]) -> None:
        """The MESSAGE records of one read (as built for the workers)."""
        size = sum(map(len, records)) + (RECEIVED_OVERHEAD_BYTES + SUMMARY_BYTES) * len(records)
        gone = None
        with self._lock:
            self._entries.extend(records)
            self._appended += len(records)
            self._bytes += size
            if self._bytes > self.capacity_bytes:
                gone = self._evict()
        del gone  # the evicted entries are freed here, once the lock is released

    def sent(self, prefix: bytes, payload: bytes, trace: WriteTrace | None) -> None:
        """A SIP message queued on a connection (``prefix``: that connection's message prefix)."""
        entry = (prefix, time.time(), trace.trace_id if trace is not None else 0, payload)
        gone = None
        with self._lock:
            self._entries.append(entry)
            self._appended += 1
            self._bytes += len(payload) + SENT_OVERHEAD_BYTES + SUMMARY_BYTES
            if self._bytes > self.capacity_bytes:
                gone = self._evict()
        del gone  # the evicted entries are freed here, once the lock is released

    def _evict(self) -> list[bytes | Outbound]:
        """Take the oldest entries off, down to the low-water mark (the lock is held); returns them.

        Down to :data:`EVICT_TO_SIXTEENTHS` of the capacity, not just below it, so that eviction runs
        once per many appends; but that margin is at most :data:`EVICT_STEP_BYTES`, so one eviction's
        work is bounded whatever the capacity. The caller drops what is returned after releasing the
        lock: freeing thousands of messages is most of an eviction's cost.
        """
        entries = self._entries
        popleft = entries.popleft
        held = self._bytes
        capacity = self.capacity_bytes
        low = capacity - min(capacity - capacity * EVICT_TO_SIXTEENTHS // 16, EVICT_STEP_BYTES)
        gone: list[bytes | Outbound] = []
        keep = gone.append
        received, sent = RECEIVED_OVERHEAD_BYTES + SUMMARY_BYTES, SENT_OVERHEAD_BYTES + SUMMARY_BYTES
        while held > low and entries:
            entry = popleft()
            keep(entry)
            held -= len(entry) + received if isinstance(entry, bytes) else len(entry[3]) + sent  # charge(), inline
        self._bytes = held
        self._evicted += len(gone)
        return gone

    # -- readers: the control thread -------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {
                "messages": len(self._entries),
                "bytes": self._bytes,
                "capacity_bytes": self.capacity_bytes,
                "appended": self._appended,
                "evicted": self._evicted,
            }

    def entries(self, from_seq: int = 0, limit: int | None = None) -> tuple[int, list[bytes | Outbound]]:
        """(seq of the oldest entry held, at most ``limit`` entries numbered ``max(from_seq, oldest)`` on).

        Only those references are copied, walking from the nearer end of the deque: a query for what
        arrived since the last one holds the lock for the new entries, not for the whole ring.
        """
        with self._lock:
            entries = self._entries
            held = len(entries)
            oldest = self._appended - held
            start = min(max(from_seq - oldest, 0), held)
            count = min(held - start, held if limit is None else limit)
            after = held - start - count  # entries newer than the ones wanted
            if start <= after:
                return oldest, list(itertools.islice(entries, start, start + count))
            newest_first = list(itertools.islice(reversed(entries), after, after + count))
        newest_first.reverse()
        return oldest, newest_first

    def picked(self, seqs: Sequence[int]) -> list[bytes | Outbound | None]:
        """The entries numbered ``seqs`` (None for one evicted or not yet appended): for one call's messages."""
        with self._lock:
            entries = self._entries
            held = len(entries)
            oldest = self._appended - held
            return [entries[seq - oldest] if 0 <= seq - oldest < held else None for seq in seqs]


def charge(entry: bytes | Outbound) -> int:
    """What the ring counts for one entry: its message bytes, its overhead and its summary's."""
    if isinstance(entry, bytes):
        return len(entry) + RECEIVED_OVERHEAD_BYTES + SUMMARY_BYTES
    return len(entry[3]) + SENT_OVERHEAD_BYTES + SUMMARY_BYTES


def decode(seq: int, entry: bytes | Outbound) -> Captured:
    """A ring entry as a :class:`Captured` (an entry the ring took is always well formed)."""
    if isinstance(entry, bytes):
        (record,) = RecordReader().feed(entry)
        assert isinstance(record, MessageRecord)
        parsed = parse_traceparent(record.trace_context) if record.trace_context else None
        trace = f"{parsed[0]:032x}" if parsed is not None else ""
        return Captured(
            seq, record.received_at, "in", record.conn_id, record.transport, record.local, record.remote, trace,
            record.raw,
        )  # fmt: skip
    prefix, sent_at, trace_id, payload = entry
    conn_id, transport, local, remote, _, _ = decode_prefix(prefix)
    return Captured(
        seq, sent_at, "out", conn_id, transport, local, remote, f"{trace_id:032x}" if trace_id else "", bytes(payload)
    )
