"""Where a message's time goes: latency histograms of the stages a message crosses.

A received request's path, and the histogram that times each leg (all over
:data:`LATENCY_BUCKETS_MS`, in ms)::

    read ──> framed ──────> picked up ──────> routed ─ ─ ─> write queued ──────> sent
      read_framed_ms   queue_wait_ms      routing_ms                write_latency_ms
      (I/O thread)     (worker)           (worker)                  (I/O thread)

``read_framed_ms``: from the start of the read that completed the message
(the ``recv``, TLS decryption) through its framing, to the moment its batch
is handed over. ``queue_wait_ms``: from then until the worker starts
routing it: the per-message checks, sampling and encoding, messages held
back for fairness, the channel's backlog, the worker busy with earlier
messages, the scheduler's wake-up. ``routing_ms``: the worker's parse and routing of the
message, write jobs submitted. ``write_latency_ms`` (the write job from its
owning thread queueing it to its outcome) and ``dispatch_latency_ms`` (the
round trip through a worker, from send to its done count) are the I/O
thread's older figures; see :mod:`~sipwire.transport.iometrics`.

The two worker stages cross a process boundary: the record carries the
framed time (``received_at``, UNIX seconds: one clock for every process of
the host), and each worker keeps its own histograms and sends what it added
since its last report in a STAGES record (:func:`encode_stages`) at most
every :data:`REPORT_SECONDS`, so the data path pays a clock read, a bisect
and two additions per message.
"""

from __future__ import annotations

import bisect
import struct
from typing import Final, NamedTuple

#: Upper bounds (ms) of the latency histograms (stages, dispatch, write jobs); one more bucket counts the
#: rest. A stage in the I/O thread or the worker takes tens of microseconds: hence the low end.
LATENCY_BUCKETS_MS: Final = (
    0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
)  # fmt: skip
#: The worker's stages, in the order of a STAGES record.
WORKER_STAGES: Final = ("queue_wait_ms", "routing_ms")
#: A worker reports its stage histograms at most this often.
REPORT_SECONDS: Final = 0.25

_BUCKETS: Final = len(LATENCY_BUCKETS_MS) + 1
_STAGE = struct.Struct(f"!d{_BUCKETS}I")
STAGES_BYTES: Final = _STAGE.size * len(WORKER_STAGES)


class LatencyHistogram:
    """Counts per :data:`LATENCY_BUCKETS_MS` bucket (one more for the rest) and the sum, in ms."""

    __slots__ = ("counts", "sum_ms")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.sum_ms = 0.0

    def observe(self, elapsed_ms: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_MS, elapsed_ms)] += times
        self.sum_ms += elapsed_ms * times

    def add(self, counts: list[int] | tuple[int, ...], sum_ms: float) -> None:
        mine = self.counts
        for index, count in enumerate(counts):
            mine[index] += count
        self.sum_ms += sum_ms

    def copy(self) -> LatencyHistogram:
        """A copy another thread may take while this one observes: ``list()`` of the counts is one step."""
        twin = LatencyHistogram()
        twin.counts = list(self.counts)
        twin.sum_ms = self.sum_ms
        return twin

    @property
    def observed(self) -> int:
        return sum(self.counts)


class StagesRecord(NamedTuple):
    """A worker's stage histograms since its last report: (counts, sum_ms) per :data:`WORKER_STAGES`."""

    stages: tuple[tuple[tuple[int, ...], float], ...]

    def body(self) -> bytes:
        """The record's body again, as :func:`encode_stages` wrote it."""
        return b"".join(_STAGE.pack(sum_ms, *counts) for counts, sum_ms in self.stages)


def encode_stages(histograms: list[LatencyHistogram]) -> bytes:
    """The body of a STAGES record for ``histograms`` (one per :data:`WORKER_STAGES`)."""
    return b"".join(_STAGE.pack(histogram.sum_ms, *histogram.counts) for histogram in histograms)


def decode_stages(body: bytes) -> StagesRecord:
    """Raises ValueError when ``body`` is not a STAGES body of this build's bucket layout."""
    if len(body) != STAGES_BYTES:
        raise ValueError(f"STAGES record of {len(body)} bytes (expected {STAGES_BYTES})")
    stages = []
    for offset in range(0, STAGES_BYTES, _STAGE.size):
        sum_ms, *counts = _STAGE.unpack_from(body, offset)
        stages.append((tuple(counts), sum_ms))
    return StagesRecord(tuple(stages))


def min_timeout(*timeouts: float | None) -> float | None:
    """The shortest of some selector timeouts, None (wait for ever) meaning no deadline."""
    given = [timeout for timeout in timeouts if timeout is not None]
    return min(given) if given else None


class WorkerStages:
    """A worker's queue-wait and routing histograms, reported as deltas."""

    __slots__ = ("_due", "queue_wait", "routing")

    def __init__(self) -> None:
        self.queue_wait = LatencyHistogram()
        self.routing = LatencyHistogram()
        self._due = 0.0

    def seconds_to_report(self, now: float) -> float | None:
        """How long until what is observed must be reported (a worker that goes idle still reports it)."""
        return max(self._due - now, 0.0) if self.routing.observed else None

    def report(self, now: float) -> bytes | None:
        """The STAGES body of what was observed since the last report, when one is due; then start afresh."""
        if now < self._due or not self.routing.observed:  # every routed message is in both
            return None
        body = encode_stages([self.queue_wait, self.routing])
        self.queue_wait = LatencyHistogram()
        self.routing = LatencyHistogram()
        self._due = now + REPORT_SECONDS
        return body
