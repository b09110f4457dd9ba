"""What an I/O thread reports about itself: stats-block record and slots, latency histograms, snapshots.

The stats block (layout and rules: ``transport/statsblock.py``) gets this
thread's record and the slots of its connections, written from the timer tick
so the message path never touches shared memory; a closed connection's slot is
cleared, then given back. Write-job latency is counted here as each job ends
(dispatch latency where a worker's done count arrives, in ``iochannel.py``).
The control socket's snapshot and the supervisor's totals are copies of the
same figures, so they live here too.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass

from sipwire.transport.connection import Connection, ConnectionInfo
from sipwire.transport.iostate import IOState
from sipwire.transport.stages import WORKER_STAGES, LatencyHistogram
from sipwire.transport.statsblock import THREAD_ACTIVE, THREAD_RETIRING


@dataclass(frozen=True, slots=True)
class ThreadStatistics:
    """What one I/O thread reports: load, connections, queues, counters."""

    index: int
    connections: int
    load: float
    queue_depth: int
    jobs: int
    loop_lag_ms: float
    pending_write_bytes: int
    outstanding: tuple[int, ...]
    counters: dict[str, int]
    handshake_buckets: tuple[int, ...]
    ws_handshake_buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ThreadTotals:
    """Copies of one thread's cumulative figures, for the supervisor's stats-block writes."""

    counters: dict[str, int]
    handshake_buckets: list[int]
    ws_handshake_buckets: list[int]
    latency: dict[str, LatencyHistogram]  # by stats-block histogram name
    done_by_worker: list[int]
    outstanding: list[int]
    inbox_depth: int


class MetricsLayer(IOState):
    """Stats block, histograms and snapshots of an I/O thread; see the module docstring."""

    def _write_stats(self, now: float) -> None:
        """This thread's record, and the slots of its connections that changed since last written.

        A connection takes a slot the first time it is written, so one opened and closed
        between two ticks costs nothing; an unchanged one costs a tuple compare.
        """
        stats = self._stats
        assert stats is not None
        if self.stats_record >= 0:
            stats.write_thread(
                self.stats_record, THREAD_RETIRING if self._retire_deadline else THREAD_ACTIVE, self.index,
                len(self.conns), self._load, self._lag * 1000.0, len(self.inbox), sum(self.outstanding), self._jobs,
                self.pending_write_bytes, now, self._started,
            )  # fmt: skip
        index = self.index
        hub = self.hub
        write = stats.write_connection
        for conn in self.conns.values():
            # Everything a slot shows moves with one of these (last_activity with bytes or state).
            mark = (
                conn.state, conn.bytes_in, conn.bytes_out, conn.queued_total, conn.messages_out, conn.in_flight, index
            )  # fmt: skip
            if mark == conn.stats_mark:
                continue
            slot = conn.stats_slot
            if slot < 0:
                slot = hub.alloc_slot(first_try=slot == -1)
                if slot < 0:
                    conn.stats_slot = -2  # counted once; asks again next tick
                    continue
                conn.stats_slot = slot
            write(slot, conn, index)
            conn.stats_mark = mark

    def _free_slot(self, conn: Connection) -> None:
        """Clear a closed connection's slot, then give it back (the next owner writes after us)."""
        slot = conn.stats_slot
        conn.stats_slot = -1
        stats = self.hub.stats
        if stats is not None:
            stats.clear_slot(slot)
        self.hub.free_slot(slot)

    def _write_done(self, queued_at: float) -> None:
        """Write-job latency: from the owning thread queueing the job to its outcome."""
        self._write_latency.observe((time.monotonic() - queued_at) * 1000.0)

    def stats_totals(self) -> ThreadTotals:
        """Cross-thread read for the supervisor: copies made under the GIL (each one atomic), no lock."""
        return ThreadTotals(
            dict(self.counters), list(self._handshake_buckets), list(self._ws_handshake_buckets),
            self._latency_copies(), list(self.done_by_worker), list(self.outstanding), len(self.inbox),
        )  # fmt: skip

    def _latency_copies(self) -> dict[str, LatencyHistogram]:
        latency = {
            "read_framed_ms": self._read_framed.copy(),
            "dispatch_latency_ms": self._dispatch_latency.copy(),
            "write_latency_ms": self._write_latency.copy(),
        }
        for name, histogram in zip(WORKER_STAGES, self._worker_stages, strict=True):
            latency[name] = histogram.copy()
        return latency

    def snapshot(self, future: Future[tuple[ThreadStatistics, list[ConnectionInfo]]], with_connections: bool) -> None:
        """Inbox job: statistics and (optionally) connection snapshots, answered through ``future``."""
        stats = ThreadStatistics(
            index=self.index,
            connections=len(self.conns),
            load=round(self._load, 4),
            queue_depth=len(self.inbox),
            jobs=self._jobs,
            loop_lag_ms=round(self._lag * 1000, 3),
            pending_write_bytes=self.pending_write_bytes,
            outstanding=tuple(self.outstanding),
            counters=dict(self.counters),
            handshake_buckets=tuple(self._handshake_buckets),
            ws_handshake_buckets=tuple(self._ws_handshake_buckets),
        )
        now = self._now
        infos = [conn.info(self.index, now) for conn in self.conns.values()] if with_connections else []
        future.set_result((stats, infos))
