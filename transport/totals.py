"""Sums of the I/O threads' cumulative figures, for the supervisor's stats block and ``ctl stats``.

Each I/O thread keeps its own histogram buckets and done counts (no lock on
the data path); the supervisor adds them up here, including those of
threads that retired, so the published figures never dip after a resize.
"""

from __future__ import annotations

import dataclasses

from sipwire.transport.iometrics import ThreadTotals
from sipwire.transport.statsblock import HANDSHAKE_BUCKETS_MS, LATENCY_BUCKETS_MS


@dataclasses.dataclass(slots=True)
class Totals:
    """Histogram buckets and per-worker done counts summed over I/O threads."""

    handshake: list[int]
    ws_handshake: list[int]
    dispatch: list[int]
    dispatch_ms: float
    write: list[int]
    write_ms: float
    done_by_worker: list[int]

    @classmethod
    def empty(cls, workers: int) -> Totals:
        latency = len(LATENCY_BUCKETS_MS) + 1
        handshake = len(HANDSHAKE_BUCKETS_MS) + 1
        return cls([0] * handshake, [0] * handshake, [0] * latency, 0.0, [0] * latency, 0.0, [0] * workers)

    def copy(self) -> Totals:
        return Totals(
            list(self.handshake), list(self.ws_handshake), list(self.dispatch), self.dispatch_ms, list(self.write),
            self.write_ms, list(self.done_by_worker),
        )  # fmt: skip

    def add(self, thread: ThreadTotals) -> None:
        for mine, theirs in (
            (self.handshake, thread.handshake_buckets),
            (self.ws_handshake, thread.ws_handshake_buckets),
            (self.dispatch, thread.dispatch_buckets),
            (self.write, thread.write_buckets),
            (self.done_by_worker, thread.done_by_worker),
        ):
            for index, value in enumerate(theirs):
                mine[index] += value
        self.dispatch_ms += thread.dispatch_ms
        self.write_ms += thread.write_ms
