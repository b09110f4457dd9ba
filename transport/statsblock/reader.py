"""Reading the stats block: attach, check the layout, copy records whole (seqlock and CRC), decode them.

A reader never talks to the transport and never blocks its writer, so
``sipwire ctl stats`` and the console answer even when every I/O thread is
saturated. :meth:`StatsReader.header` also says whether the writer is
alive and current; :meth:`StatsReader.require_live` turns a dead or silent
one into :class:`StatsWriterGoneError`.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
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
    COUNTER_TABLE_FIXED,
    HEADER_BYTES,
    HISTOGRAM_BYTES,
    HISTOGRAM_MAX_BOUNDS,
    HISTOGRAM_NAMES,
    LAYOUT_VERSION,
    MAGIC,
    SLOT_BYTES,
    STALE_SECONDS,
    STATE_NAMES,
    STATIC_BYTES,
    STATUS_NAMES,
    THREAD_ACTIVE,
    THREAD_BYTES,
    THREAD_STATE_NAMES,
    THREAD_UNUSED,
    TRANSPORT_NAMES,
    WORKER_BYTES,
    Capacities,
    _text,
)
from sipwire.transport.statsblock.records import (
    BlockHeader,
    ConnectionRecord,
    Counters,
    Histogram,
    ReadCounts,
    ThreadRecord,
    WorkerRecord,
)
from sipwire.transport.statsblock.shm import _Block, _open_shm, published_block_name

if TYPE_CHECKING:
    from multiprocessing.shared_memory import SharedMemory

    from sipwire.config import Settings

#: Seqlock read attempts per record before it is reported unreadable; the first
#: :data:`SPIN_ATTEMPTS` retry at once, the rest sleep :data:`RETRY_SLEEP_SECONDS`
#: (a writer descheduled inside a record needs the CPU back), so one record costs a
#: reader at most about 60 ms.
READ_ATTEMPTS: Final = 64
SPIN_ATTEMPTS: Final = 4
RETRY_SLEEP_SECONDS: Final = 0.001
#: Sanity bounds a reader checks before trusting capacities read from a block.
_MAX_CAPACITY: Final = {"threads": 4096, "workers": 1024, "slots": 1 << 22, "counters": 65536, "histograms": 16}
_EMPTY_ID: Final = bytes(8)
#: A reader's string caches are dropped past this many entries (bounded memory over a long run).
_DECODE_CACHE_ENTRIES: Final = 65536


# -- errors -------------------------------------------------------------------------------------


class StatsUnavailableError(StatsError):
    """No stats block exists for this instance (the transport is not running, or another instance)."""


class StatsLayoutError(StatsError):
    """The block has another layout version, or is malformed or truncated."""


class StatsWriterGoneError(StatsError):
    """The process that wrote the block is gone, or has not updated it for :data:`STALE_SECONDS`."""


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


# -- reader ---------------------------------------------------------------------------------------


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
        """The block the instance's transport published in its runtime directory."""
        name = published_block_name(settings)
        if name is None:
            raise StatsUnavailableError(
                f"no stats block published in {settings.runtime_dir}: is the transport running, "
                "with this --instance and --state-dir?"
            )
        return cls.open(name)

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
            values: tuple[Any, ...] = (0.0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b"", b"", b"", b"")
        else:
            values = _HEADER.unpack_from(body, 0)
        (
            updated_wall, updated_mono, updates, status, threads_wanted, threads_running, workers_wanted,
            workers_alive, max_connections, connections, slots_used, slots_refused, thread_records_refused,
            pending, queue_depth, in_flight, tcp, tls, ws, wss,
        ) = values  # fmt: skip
        addresses = (("tcp", tcp), ("tls", tls), ("ws", ws), ("wss", wss))
        listening = {name: _text(raw) for name, raw in addresses if _text(raw)}
        return BlockHeader(
            name=self.name, instance=self.instance, layout_version=LAYOUT_VERSION, writer_pid=pid,
            started_wall=started_wall, started_mono=started_mono, capacities=self.capacities,
            updated_wall=updated_wall, updated_mono=updated_mono, updates=updates,
            status=STATUS_NAMES.get(status, f"unknown({status})"), threads_wanted=threads_wanted,
            threads_running=threads_running, workers_wanted=workers_wanted, workers_alive=workers_alive,
            max_connections=max_connections, connections=connections, slots_used=slots_used,
            slots_refused=slots_refused, thread_records_refused=thread_records_refused, pending_write_bytes=pending,
            queue_depth=queue_depth, dispatch_in_flight=in_flight, listening=listening, writer_alive=pid_alive(pid),
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
    """Validate the static header against :mod:`.layout`; bounds first."""
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
