"""The stats block's single writer: the transport process creates, fills and removes the block.

:class:`StatsWriter` publishes every record through its seqlock (see
:mod:`.layout`, "Torn reads"); :class:`FreeList` hands out connection slots
and thread records. A writer that finds a block of the same name replaces
it if its writer is dead or long silent (:func:`remove_stale_block`), and
refuses with :class:`StatsBusyError` if it is live. A clean shutdown marks
the block stopped and unlinks it.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from zlib import crc32

from sipwire.errors import StatsError
from sipwire.transport.statsblock.layout import (
    _COUNTER_ENTRY,
    _COUNTER_FIXED,
    _CRC,
    _HEADER,
    _HEADER_BODY,
    _HISTOGRAM_BODY,
    _HISTOGRAM_BOUNDS_AT,
    _HISTOGRAM_COUNTS_AT,
    _HISTOGRAM_FIXED,
    _SEQ_BYTES,
    _SLOT,
    _SLOT_BODY,
    _STATIC,
    _THREAD,
    _THREAD_BODY,
    _WORKER,
    _WORKER_BODY,
    COUNTER_ENTRY_BYTES,
    COUNTER_NAME_BYTES,
    COUNTER_TABLE_FIXED,
    HISTOGRAM_BYTES,
    HISTOGRAM_MAX_BOUNDS,
    HISTOGRAM_NAMES,
    LAYOUT_VERSION,
    MAGIC,
    SLOT_BYTES,
    STALE_SECONDS,
    STATE_CODES,
    STATUS_STOPPED,
    STATUS_STOPPING,
    THREAD_BYTES,
    TRANSPORT_CODES,
    WORKER_BYTES,
    Capacities,
    _field,
)
from sipwire.transport.statsblock.reader import (
    StatsLayoutError,
    StatsReader,
    StatsUnavailableError,
    pid_alive,
)
from sipwire.transport.statsblock.shm import _Block, _open_shm, _unlink_shm

if TYPE_CHECKING:
    from multiprocessing.shared_memory import SharedMemory

    from sipwire.transport.connection import Connection

_ZERO_SLOT: Final = bytes(_SLOT_BODY)
_ZERO_THREAD: Final = bytes(_THREAD_BODY)


class StatsBusyError(StatsError):
    """A live transport already writes this instance's block."""


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
    queue_depth: int
    dispatch_in_flight: int
    listening: Mapping[str, str]


# -- writer ---------------------------------------------------------------------------------------


class StatsWriter(_Block):
    """The transport's side. Each record has one writer at a time (see :mod:`.layout`)."""

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
            figures.pending_write_bytes, min(figures.queue_depth, 0xFFFFFFFF),
            min(figures.dispatch_in_flight, 0xFFFFFFFF),
            _field(listening.get("tcp", ""), 48), _field(listening.get("tls", ""), 48),
            _field(listening.get("ws", ""), 48), _field(listening.get("wss", ""), 48),
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
        queue_depth: int,
        in_flight: int,
        jobs: int,
        pending_write_bytes: int,
        heartbeat: float,
        started: float,
    ) -> None:
        body = _THREAD.pack(
            state, index, connections, load, loop_lag_ms, queue_depth, in_flight, jobs, pending_write_bytes,
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
