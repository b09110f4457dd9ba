"""Sums of the I/O threads' cumulative figures, for the supervisor's stats block and ``ctl stats``.

Each I/O thread keeps its own histogram buckets and done counts (no lock on
the data path); the supervisor adds them up here, including those of
threads that retired, so the published figures never dip after a resize.
"""

from __future__ import annotations

import dataclasses

from sipwire.transport.iometrics import ThreadTotals
from sipwire.transport.stages import LatencyHistogram
from sipwire.transport.statsblock import HANDSHAKE_BUCKETS_MS, LATENCY_HISTOGRAMS


@dataclasses.dataclass(slots=True)
class Totals:
    """Histogram buckets and per-worker done counts summed over I/O threads."""

    handshake: list[int]
    ws_handshake: list[int]
    latency: dict[str, LatencyHistogram]  # by stats-block histogram name (LATENCY_HISTOGRAMS)
    done_by_worker: list[int]

    @classmethod
    def empty(cls, workers: int) -> Totals:
        handshake = len(HANDSHAKE_BUCKETS_MS) + 1
        latency = {name: LatencyHistogram() for name in LATENCY_HISTOGRAMS}
        return cls([0] * handshake, [0] * handshake, latency, [0] * workers)

    def copy(self) -> Totals:
        latency = {name: histogram.copy() for name, histogram in self.latency.items()}
        return Totals(list(self.handshake), list(self.ws_handshake), latency, list(self.done_by_worker))

    def add(self, thread: ThreadTotals) -> None:
        for mine, theirs in (
            (self.handshake, thread.handshake_buckets),
            (self.ws_handshake, thread.ws_handshake_buckets),
            (self.done_by_worker, thread.done_by_worker),
        ):
            for index, value in enumerate(theirs):
                mine[index] += value
        for name, histogram in thread.latency.items():
            self.latency[name].add(histogram.counts, histogram.sum_ms)
