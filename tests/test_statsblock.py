"""The shared-memory stats block: byte layout, seqlock under hammering writers, liveness, resource_tracker,
and a real transport publishing to it while a reader hammers it."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipwire.config import Settings
from sipwire.transport.connection import Connection
from sipwire.transport.framing import FramerLimits
from sipwire.transport.hub import Hub
from sipwire.transport.statsblock import (
    HISTOGRAM_NAMES,
    HISTOGRAMS,
    LATENCY_BUCKETS_MS,
    LAYOUT_VERSION,
    MAGIC,
    NAME_FILE,
    SLOT_BYTES,
    STALE_SECONDS,
    STATIC_BYTES,
    STATUS_STOPPED,
    THREAD_ACTIVE,
    THREAD_BYTES,
    THREAD_RETIRING,
    WORKER_BYTES,
    Capacities,
    ConnectionRecord,
    FreeList,
    HeaderFigures,
    StatsBusyError,
    StatsLayoutError,
    StatsReader,
    StatsUnavailableError,
    StatsWriter,
    StatsWriterGoneError,
    block_name,
    published_block_name,
    remove_stale_block,
)
from sipwire.transport.streams import TcpStream
from sipwire.transport.tlsinfo import TlsInfo
from tests.conftest import REPO, RunningTransport, SipClient, run_ctl, sip_request, wait_for

#: On x86-64 (TSO) the seqlock alone must catch every torn copy: the CRC never fires.
TSO = platform.machine() in ("x86_64", "AMD64")
HANDSHAKE_BOUNDS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)


@pytest.fixture
def name() -> Iterator[str]:
    """A block name no other test (or test run) uses; removed afterwards whatever happened."""
    value = f"sipwire-test.{os.getpid()}.{uuid.uuid4().hex[:10]}"
    yield value
    remove_stale_block(value, stale_after=0.0)  # every heartbeat is "stale" at 0 s: removed if left


def _figures(**changes: Any) -> HeaderFigures:
    values: dict[str, Any] = {
        "status": 1, "threads_wanted": 2, "threads_running": 2, "workers_wanted": 2, "workers_alive": 2,
        "max_connections": 16, "connections": 1, "slots_used": 1, "slots_refused": 0, "thread_records_refused": 0,
        "pending_write_bytes": 0, "queue_depth": 0, "dispatch_in_flight": 0, "listening": {"tcp": "127.0.0.1:5060"},
    }  # fmt: skip
    values.update(changes)
    return HeaderFigures(**values)


def _writer(name: str, threads: int = 4, workers: int = 2, slots: int = 16, counters: int = 256) -> StatsWriter:
    return StatsWriter.create(
        name,
        Capacities(threads=threads, workers=workers, slots=slots, counters=counters),
        "unit",
        tuple(HISTOGRAMS.values()),
    )


def _slot_fields(conn_id: int, n: int) -> tuple[Any, ...]:
    """Slot values that all derive from ``n``: a reader can tell a torn copy from a whole one."""
    return (
        conn_id, 3, 1, n & 1, n % 7, (n * 7) % 65536, n % 65536, n % 1000, float(n), float(n) + 0.5,
        n, 2 * n, 3 * n, n % 1000, 5 * n, n / 8, b"10.0.0.1", f"10.{n % 256}.{(n >> 8) % 256}.1".encode(),
        b"TLSv1.3", f"CIPHER-{n}".encode(), f"name-{n}".encode(), f"CN=peer {n}".encode(),
    )  # fmt: skip


def _check_derived(record: ConnectionRecord) -> int:
    """Assert every field of ``record`` derives from the same ``n``; return it."""
    n = record.bytes_in
    expected = (
        record.id, "open", "tcp", bool(n & 1), n % 7, f"10.0.0.1:{(n * 7) % 65536}",
        f"10.{n % 256}.{(n >> 8) % 256}.1:{n % 65536}", n % 1000, float(n), float(n) + 0.5, 2 * n, 3 * n, n % 1000,
        5 * n, n / 8, "TLSv1.3", f"CIPHER-{n}", f"name-{n}", f"CN=peer {n}",
    )  # fmt: skip
    actual = (
        record.id, record.state, record.transport, record.outbound, record.thread, record.local, record.remote,
        record.in_flight, record.created, record.last_activity, record.bytes_out, record.messages_in,
        record.messages_out, record.pending_write_bytes, record.tls_handshake_ms, record.tls_version,
        record.tls_cipher, record.tls_server_name, record.tls_peer_subject,
    )  # fmt: skip
    assert actual == expected, f"torn record in slot {record.slot}: {record}"
    return n


# -- layout ----------------------------------------------------------------------------------------


def test_layout_offsets_match_the_docstring(name: str) -> None:
    capacities = Capacities(threads=4, workers=3, slots=5, counters=8)
    layout = capacities.layout()
    assert layout.header == STATIC_BYTES == 256
    assert layout.threads == 640
    assert layout.workers == 640 + 4 * THREAD_BYTES
    assert layout.counters == layout.workers + 3 * WORKER_BYTES
    assert layout.histograms == layout.counters + 64 + 64 * 8
    assert layout.slots == layout.histograms + 7 * 576
    assert layout.total == layout.slots + 5 * SLOT_BYTES
    assert all(offset % 64 == 0 for offset in (layout.threads, layout.workers, layout.counters, layout.slots))

    writer = StatsWriter.create(name, capacities, "layout", (HANDSHAKE_BOUNDS, LATENCY_BUCKETS_MS))
    try:
        now = time.monotonic()
        listening = {"tcp": "127.0.0.1:5060", "tls": "[::1]:5061", "ws": "127.0.0.1:8088", "wss": "[::1]:8089"}
        writer.write_header(_figures(connections=7, listening=listening))
        writer.write_thread(2, THREAD_ACTIVE, 1, 11, 0.25, 1.5, 3, 4, 99, 1234, now, now - 1)
        writer.write_worker(1, 4242, True, 5, 77, 2, now, now - 2)
        writer.write_counters({"messages_in": 42})
        writer.write_slot_fields(4, _slot_fields(9, 300))
        buf = writer.shm.buf
        assert buf is not None
        u8 = lambda at: buf[at]  # noqa: E731
        u16 = lambda at: struct.unpack_from("<H", buf, at)[0]  # noqa: E731
        u32 = lambda at: struct.unpack_from("<I", buf, at)[0]  # noqa: E731
        u64 = lambda at: struct.unpack_from("<Q", buf, at)[0]  # noqa: E731
        f64 = lambda at: struct.unpack_from("<d", buf, at)[0]  # noqa: E731
        text = lambda at, size: bytes(buf[at : at + size]).rstrip(b"\0").decode()  # noqa: E731
        # static header
        assert bytes(buf[0:8]) == MAGIC
        assert (u32(8), u64(16), u32(24), u32(28)) == (LAYOUT_VERSION, layout.total, os.getpid(), 4)
        assert (u32(48), u32(52), u32(56), u32(60), text(64, 64)) == (3, 5, 8, 7, "layout")
        # dynamic header
        h = layout.header
        assert u64(h) % 2 == 0 and u64(h) > 0
        assert (u64(h + 32), u8(h + 40), u16(h + 42), u32(h + 52), u32(h + 56)) == (1, 1, 2, 16, 7)
        assert (text(h + 96, 48), text(h + 144, 48)) == ("127.0.0.1:5060", "[::1]:5061")
        assert (text(h + 192, 48), text(h + 240, 48)) == ("127.0.0.1:8088", "[::1]:8089")
        # thread record 2
        t = layout.threads + 2 * THREAD_BYTES
        assert (u8(t + 16), u16(t + 18), u32(t + 20), f64(t + 24), f64(t + 32)) == (1, 1, 11, 0.25, 1.5)
        assert (u32(t + 40), u32(t + 44), u64(t + 48), u64(t + 56), f64(t + 64)) == (3, 4, 99, 1234, now)
        # worker record 1
        w = layout.workers + WORKER_BYTES
        assert (u16(w + 16), u8(w + 18), u32(w + 20), u32(w + 24), u32(w + 28), u64(w + 32)) == (1, 1, 4242, 5, 2, 77)
        assert f64(w + 40) == now
        # counter table
        c = layout.counters
        assert (u32(c + 16), text(c + 64, 56), u64(c + 64 + 56)) == (1, "messages_in", 42)
        # histogram 1 (dispatch latency)
        g = layout.histograms + 576
        assert (text(g + 16, 32), u32(g + 48)) == ("dispatch_latency_ms", len(LATENCY_BUCKETS_MS))
        assert (f64(g + 72), u64(g + 312)) == (LATENCY_BUCKETS_MS[0], 0)
        # connection slot 4
        s = layout.slots + 4 * SLOT_BYTES
        assert (u64(s + 16), u8(s + 24), u8(s + 25), u16(s + 28), u16(s + 30), u16(s + 32)) == (
            9, 3, 1, 300 % 7, 2100, 300,
        )  # fmt: skip
        assert (u32(s + 36), f64(s + 40), f64(s + 48), u64(s + 56), u64(s + 64)) == (300, 300.0, 300.5, 300, 600)
        assert (u64(s + 72), u64(s + 80), u64(s + 88), f64(s + 96)) == (900, 300, 1500, 37.5)
        assert (text(s + 104, 48), text(s + 152, 48), text(s + 200, 16)) == ("10.0.0.1", "10.44.1.1", "TLSv1.3")
        assert (text(s + 216, 56), text(s + 272, 48), text(s + 320, 64)) == ("CIPHER-300", "name-300", "CN=peer 300")
    finally:
        writer.unlink()


def test_round_trip_of_every_record(name: str) -> None:
    writer = _writer(name, counters=3)
    reader = StatsReader.open(name)
    try:
        now = time.monotonic()
        writer.write_header(_figures(threads_wanted=3, connections=2, slots_refused=1, dispatch_in_flight=5))
        writer.write_thread(0, THREAD_ACTIVE, 0, 2, 0.5, 0.75, 1, 5, 10, 20, now, now - 5)
        writer.write_thread(3, THREAD_ACTIVE, 1, 0, 0.0, 0.0, 0, 0, 1, 0, now, now - 1)
        writer.write_thread(1, THREAD_RETIRING, 1, 0, 0.0, 0.0, 0, 0, 7, 0, now, now - 9)
        writer.write_worker(0, 100, True, 5, 1000, 0, now, now - 3)
        writer.write_worker(1, 0, False, 0, 10, 4, now - 8, 0.0)
        # capacity 3: the fourth name and one over 56 bytes are left out, and counted
        writer.write_counters({"a": 1, "b.c": 2, "x" * 57: 40, "d": 3, "e": 4})
        writer.write_histogram(2, LATENCY_BUCKETS_MS, list(range(len(LATENCY_BUCKETS_MS) + 1)), 12.5)
        writer.write_slot_fields(3, _slot_fields(41, 5))
        conn = _connection(77, ("::1", 5061), ("2001:db8::7", 40001))
        conn.bytes_in, conn.messages_out, conn.queued_total, conn.sent_total = 10, 2, 300, 100
        conn.set_tls(TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 4.25, "sip.example", "CN=é" * 40, ""))
        writer.write_connection(7, conn, 2)

        header = reader.header()
        assert (header.instance, header.layout_version, header.writer_pid) == ("unit", LAYOUT_VERSION, os.getpid())
        assert (header.threads_wanted, header.connections, header.slots_refused, header.dispatch_in_flight) == (
            3, 2, 1, 5,
        )  # fmt: skip
        assert header.status == "running" and header.writer_alive and not header.stale and header.live
        assert header.listening == {"tcp": "127.0.0.1:5060"}

        active = reader.threads()
        assert [(t.record, t.index, t.state) for t in active] == [(0, 0, "active"), (3, 1, "active")]
        assert (active[0].connections, active[0].load, active[0].jobs, active[0].started) == (2, 0.5, 10, now - 5)
        every = reader.threads(include_retiring=True)
        assert [(t.record, t.state) for t in every] == [(0, "active"), (3, "active"), (1, "retiring")]
        writer.clear_thread(3)
        assert [t.record for t in reader.threads()] == [0]

        workers = reader.workers()
        assert [(w.index, w.pid, w.alive, w.in_flight, w.done, w.restarts) for w in workers] == [
            (0, 100, True, 5, 1000, 0),
            (1, 0, False, 0, 10, 4),
        ]

        counters = reader.counters()
        assert counters.values == {"a": 1, "b.c": 2, "d": 3}
        assert (counters.dropped_names, counters.dropped_value) == (2, 44)
        writer.write_counters({"a": 5, "b.c": 2, "d": 3})  # names keep their entries
        assert reader.counters().values == {"a": 5, "b.c": 2, "d": 3}

        histograms = reader.histograms()
        assert list(histograms) == list(HISTOGRAM_NAMES)
        assert histograms["tls_handshake_ms"].bounds == HANDSHAKE_BOUNDS
        write = histograms["write_latency_ms"]
        assert write.counts == tuple(range(len(LATENCY_BUCKETS_MS) + 1)) and write.sum_ms == 12.5
        assert write.count == sum(write.counts)

        by_slot = {record.slot: record for record in reader.connections()}
        assert sorted(by_slot) == [3, 7]
        assert _check_derived(by_slot[3]) == 5
        tls = by_slot[7]
        assert (tls.id, tls.state, tls.transport, tls.thread, tls.local, tls.remote) == (
            77, "handshake", "tls", 2, "[::1]:5061", "[2001:db8::7]:40001",
        )  # fmt: skip
        assert (tls.bytes_in, tls.messages_out, tls.pending_write_bytes, tls.tls_handshake_ms) == (10, 2, 200, 4.25)
        assert (tls.tls_version, tls.tls_cipher, tls.tls_server_name) == (
            "TLSv1.3",
            "TLS_AES_256_GCM_SHA384",
            "sip.example",
        )
        assert "CN=é".startswith(tls.tls_peer_subject[:4]) and len(tls.tls_peer_subject.encode()) <= 64  # cut to fit

        writer.clear_slot(3)
        assert [record.slot for record in reader.connections()] == [7]
        assert reader.counts.crc_failures == 0 and reader.counts.unreadable == 0
    finally:
        reader.close()
        writer.unlink()


def _connection(conn_id: int, local: tuple[str, int], remote: tuple[str, int]) -> Connection:
    """A real Connection object on a socketpair end (write_connection reads its attributes)."""
    left, right = socket.socketpair()
    right.close()
    conn = Connection(conn_id, left, TcpStream(left), "tls", local, remote, FramerLimits(65536, 16384), 100.0)
    left.close()
    return conn


def test_free_list_hands_out_lowest_first_and_counts_refusals_once() -> None:
    free = FreeList(3)
    assert [free.take() for _ in range(3)] == [0, 1, 2]
    assert free.used == 3
    assert free.take() == -1
    assert free.take(count_refusal=False) == -1  # the same connection asking again
    assert free.refused == 1
    free.give(1)
    assert (free.used, free.take()) == (2, 1)


def test_hub_slots_come_from_the_block(name: str) -> None:
    hub = Hub(Settings(), worker_count=1)
    assert hub.alloc_slot() == -1  # no block: no slots, nothing written
    writer = _writer(name, slots=2)
    try:
        hub.set_stats(writer)
        assert [hub.alloc_slot(), hub.alloc_slot(), hub.alloc_slot()] == [0, 1, -1]
        hub.free_slot(0)
        assert hub.alloc_slot() == 0
        assert (hub.slots.used, hub.slots.refused, hub.thread_records.capacity) == (2, 1, 4)
    finally:
        writer.unlink()


def test_block_names_separate_instances_users_and_state_dirs(tmp_path: Path) -> None:
    names = {
        block_name("default", tmp_path / "a" / "default"),
        block_name("default", tmp_path / "b" / "default"),
        block_name("other", tmp_path / "a" / "other"),
        block_name("default", tmp_path / "a" / "default", uid=12345),
    }
    assert len(names) == 4
    one = block_name("default", tmp_path / "a" / "default")
    assert one == block_name("default", str(tmp_path / "a" / "default"))
    assert one.startswith(f"sipwire.{os.getuid()}.default.") and "/" not in one
    assert len(block_name("x" * 200, tmp_path)) < 120


# -- liveness and versions -------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_layout_version_mismatch_and_bad_blocks_are_refused(name: str) -> None:
    writer = _writer(name)
    buf = writer.shm.buf
    assert buf is not None
    try:
        struct.pack_into("<I", buf, 8, LAYOUT_VERSION + 1)
        with pytest.raises(StatsLayoutError, match=rf"layout version {LAYOUT_VERSION + 1}, this reader understands "):
            StatsReader.open(name)
        struct.pack_into("<I", buf, 8, LAYOUT_VERSION)
        struct.pack_into("<Q", buf, 16, 12)  # total size that does not match the capacities
        with pytest.raises(StatsLayoutError, match="truncated"):
            StatsReader.open(name)
        buf[0:8] = b"\0" * 8
        with pytest.raises(StatsLayoutError, match="no valid magic"):
            StatsReader.open(name)
    finally:
        writer.unlink()
    with pytest.raises(StatsUnavailableError, match="is the transport running"):
        StatsReader.open(name)


def test_dead_writer_and_stale_heartbeat_are_flagged(name: str) -> None:
    dead = _dead_pid()
    writer = StatsWriter.create(name, Capacities(2, 1, 4), "gone", pid=dead)
    reader = StatsReader.open(name)
    try:
        writer.write_header(_figures())
        header = reader.header()
        assert (header.writer_pid, header.writer_alive, header.live) == (dead, False, False)
        with pytest.raises(StatsWriterGoneError, match=rf"pid {dead}\) that wrote stats block .* is gone"):
            reader.require_live()
    finally:
        reader.close()
        writer.close()  # as a crash would: the block stays behind
    assert remove_stale_block(name)
    assert not remove_stale_block(name)

    writer = _writer(name)
    reader = StatsReader.open(name)
    try:
        old = time.monotonic() - STALE_SECONDS - 1.0
        writer.write_header(_figures(), at=(time.time() - STALE_SECONDS - 1.0, old))
        header = reader.header()
        assert header.writer_alive and header.stale and not header.live
        with pytest.raises(StatsWriterGoneError, match="has not updated stats block"):
            reader.require_live()
        assert reader.require_live(allow_stale=True).stale
        writer.write_header(_figures())
        assert reader.require_live().live
    finally:
        reader.close()
        writer.unlink()


def test_writer_replaces_a_dead_or_stopped_writers_block_and_refuses_a_live_one(name: str) -> None:
    crashed = StatsWriter.create(name, Capacities(2, 1, 4), "old", pid=_dead_pid())
    crashed.write_slot_fields(0, _slot_fields(1, 1))
    crashed.close()  # killed: never unlinked
    writer = _writer(name)
    try:
        with StatsReader.open(name) as reader:
            assert (reader.instance, reader.header().writer_pid, reader.connections()) == ("unit", os.getpid(), [])
        writer.write_header(_figures())
        with pytest.raises(StatsBusyError, match=rf"live transport \(pid {os.getpid()}\)"):
            _writer(name)
        with pytest.raises(StatsBusyError):
            remove_stale_block(name)
        # a block marked stopped is replaced even though its pid (ours) is alive and its heartbeat fresh
        writer.write_header(_figures(status=STATUS_STOPPED))
    finally:
        writer.close()
    again = _writer(name)
    again.unlink()


def test_reader_process_exit_leaves_the_block_alone(name: str) -> None:
    """Python < 3.13 registers attaches with resource_tracker, which unlinks at exit: readers opt out."""
    writer = _writer(name)
    try:
        writer.write_header(_figures(connections=3))
        code = (
            "import sys; from sipwire.transport.statsblock import StatsReader\n"
            "r = StatsReader.open(sys.argv[1]); print(r.header().connections)\n"
            "if sys.argv[2] == 'close': r.close()\n"
        )
        for how in ("close", "leave-mapped"):
            done = subprocess.run(
                [sys.executable, "-c", code, name, how], capture_output=True, text=True, timeout=30, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
            )  # fmt: skip
            assert (done.returncode, done.stdout, done.stderr) == (0, "3\n", ""), how
            with StatsReader.open(name) as reader:
                assert reader.header().connections == 3
    finally:
        writer.unlink()


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="Python 3.13+ attaches without tracking")
def test_a_plain_shared_memory_attach_would_unlink_the_block(name: str) -> None:
    """The hazard the readers avoid, shown on a scratch block: a plain attach, then exit, removes it."""
    writer = _writer(name)
    try:
        code = "import sys; from multiprocessing.shared_memory import SharedMemory; SharedMemory(sys.argv[1]).close()"
        done = subprocess.run(
            [sys.executable, "-c", code, name], capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0
        with pytest.raises(StatsUnavailableError):
            StatsReader.open(name)
    finally:
        writer.close()


# -- seqlock under hammering writers ---------------------------------------------------------------


def test_seqlock_under_a_hammering_writer_thread(name: str) -> None:
    """Every record read is whole while a thread rewrites every slot as fast as it can.

    A tiny GIL switch interval makes the reader run while the writer is inside records.
    """
    slots = 64
    writer = _writer(name, slots=slots)
    reader = StatsReader.open(name)
    stop = threading.Event()
    written = [0]

    def hammer() -> None:
        n = 0
        deadline = time.monotonic() + 10.0
        while not stop.is_set() and time.monotonic() < deadline:
            n += 1
            writer.write_slot_fields(n % slots, _slot_fields(n % slots + 1, n))
            writer.write_counters({"n": n, "double": 2 * n})
        written[0] = n

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        checked = snapshots = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            for record in reader.connections():
                _check_derived(record)
                checked += 1
            counters = reader.counters().values
            assert counters.get("double", 0) == 2 * counters.get("n", 0)
            snapshots += 1
    finally:
        stop.set()
        sys.setswitchinterval(previous)
        thread.join(5.0)
        reader.close()
        writer.unlink()
    assert written[0] > 1000 and snapshots > 10 and checked > 100
    assert reader.counts.retries > 0, "the writer never raced the reader: the test proved nothing"
    assert reader.counts.unreadable == 0
    if TSO:
        assert reader.counts.crc_failures == 0


_WRITER_PROCESS = """
import select, sys, time
sys.path.insert(0, sys.argv[3])
from tests.test_statsblock import _slot_fields
from sipwire.transport.statsblock import Capacities, StatsWriter
slots = int(sys.argv[2])
writer = StatsWriter.create(sys.argv[1], Capacities(threads=2, workers=1, slots=slots), "hammer")
print("ready", flush=True)
n = 0
deadline = time.monotonic() + 20.0
while time.monotonic() < deadline and not select.select([sys.stdin], [], [], 0)[0]:
    for _ in range(1000):
        n += 1
        writer.write_slot_fields(n % slots, _slot_fields(n % slots + 1, n))
print(n, flush=True)
writer.unlink()
"""


def test_seqlock_against_a_writer_process_on_another_core(name: str) -> None:
    """The real case: writer and reader in different processes, running in parallel."""
    slots = 256
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER_PROCESS, name, str(slots), str(REPO)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    ) as writer:  # fmt: skip
        assert writer.stdin is not None and writer.stdout is not None
        try:
            assert writer.stdout.readline() == "ready\n"
            reader = StatsReader.open(name)
            try:
                checked = 0
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    for record in reader.connections():
                        _check_derived(record)
                        checked += 1
            finally:
                reader.close()
            writer.stdin.write("stop\n")
            writer.stdin.flush()
            written = int(writer.stdout.readline())
            assert writer.wait(10) == 0
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    assert written > 10_000 and checked > 1000
    assert reader.counts.retries > 0, "the writer never raced the reader: the test proved nothing"
    assert reader.counts.unreadable == 0
    if TSO:
        assert reader.counts.crc_failures == 0


# -- a real transport -------------------------------------------------------------------------------


def _block_of(running: RunningTransport) -> str:
    """The name the transport published in its runtime directory (it has a random part)."""
    runtime_dir = running.control_path.parent
    name = published_block_name(Settings(instance=runtime_dir.name, state_dir=str(runtime_dir.parent)))
    assert name is not None and name.startswith(block_name(runtime_dir.name, runtime_dir) + ".")
    return name


def test_the_block_name_is_random_and_published_privately(start_transport: Any) -> None:
    """Another local user cannot guess the name to create the block first; readers trust only the 0600 file."""
    first = start_transport(workers=1)
    second = start_transport(workers=1)
    names = {_block_of(first), _block_of(second)}
    assert len(names) == 2
    for running in (first, second):
        published = running.control_path.parent / NAME_FILE
        assert published.stat().st_mode & 0o777 == 0o600
    settings = Settings(instance="elsewhere", state_dir=str(first.control_path.parent.parent))
    (first.control_path.parent.parent / "elsewhere").mkdir(mode=0o700)
    (first.control_path.parent.parent / "elsewhere" / NAME_FILE).write_text(_block_of(first))
    assert published_block_name(settings) is None  # a name of another instance is not followed


def _consistent(record: ConnectionRecord, max_threads: int) -> None:
    """What must hold in any whole slot of the transport's (the CRC already proved it whole)."""
    assert record.id > 0 and record.state in ("open", "closing") and record.transport == "tcp", record
    assert record.local.startswith("127.0.0.1:") and record.remote.startswith("127.0.0.1:"), record
    assert 0 <= record.thread < max_threads and 0 < record.created <= record.last_activity, record
    assert record.messages_in <= record.bytes_in and record.bytes_out >= 0 and record.in_flight >= 0, record


class _Hammer:
    """A thread in the test process that reads the whole block over and over and checks every record."""

    def __init__(self, name: str, max_threads: int) -> None:
        self.reader = StatsReader.open(name)
        self.max_threads = max_threads
        self.snapshots = 0
        self.records = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + 120.0
            while not self._stop.is_set() and time.monotonic() < deadline:
                header = self.reader.header()
                assert header.writer_alive and header.status in ("starting", "running", "stopping")
                for thread in self.reader.threads(include_retiring=True):
                    assert 0 <= thread.index < self.max_threads and 0.0 <= thread.load <= 1.0, thread
                for worker in self.reader.workers():
                    assert worker.pid > 0 and worker.done >= 0, worker
                counters = self.reader.counters().values
                assert counters.get("messages_in", 0) >= 0
                for histogram in self.reader.histograms().values():
                    assert histogram.count == sum(histogram.counts), histogram
                for record in self.reader.connections():
                    _consistent(record, self.max_threads)
                    self.records += 1
                self.snapshots += 1
        except BaseException as error:  # reported by stop()
            self.failure = error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)
        self.reader.close()
        if self.failure is not None:
            raise self.failure
        assert self.reader.counts.unreadable == 0
        if TSO:
            assert self.reader.counts.crc_failures == 0


def _round(clients: list[SipClient], cseq: int) -> None:
    for index, client in enumerate(clients):
        client.send(sip_request("OPTIONS", cseq, call_id=f"block-{index}"))
    for client in clients:
        assert client.read_response().all("cseq") == [f"{cseq} OPTIONS"]


def _slots_match(reader: StatsReader, clients: list[SipClient], messages: int) -> dict[str, ConnectionRecord] | None:
    """The slots, by remote address, once they show exactly these clients with ``messages`` each."""
    by_remote = {record.remote: record for record in reader.connections()}
    wanted = {f"127.0.0.1:{client.local_port}" for client in clients}
    if set(by_remote) != wanted:
        return None
    if any((r.messages_in, r.messages_out) != (messages, messages) for r in by_remote.values()):
        return None
    return by_remote


def test_transport_publishes_through_traffic_and_resizes(start_transport: Any) -> None:
    running = start_transport(threads=4, workers=2)
    name = _block_of(running)
    hammer = _Hammer(name, max_threads=64)
    reader = StatsReader.open(name)
    clients = [SipClient.connect(running) for _ in range(8)]
    try:
        _round(clients, 1)
        slots = wait_for(lambda: _slots_match(reader, clients, 1), what="8 slots with 1 message each")
        assert sorted(r.thread for r in slots.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
        assert len({r.slot for r in slots.values()}) == 8

        for size, cseq in ((1, 2), (3, 3)):
            assert running.control("threads", size=size)["size"] == size
            _round(clients, cseq)
            slots = wait_for(lambda c=cseq: _slots_match(reader, clients, c), what=f"slots after resize to {size}")
            owners = {c["remote"]: c["thread"] for c in running.control("connections")["connections"]}
            assert {remote: r.thread for remote, r in slots.items()} == owners  # moved slots follow their owner
            threads = wait_for(
                lambda s=size: [t for t in reader.threads() if t.index < s] if len(reader.threads()) == s else None,
                what=f"{size} active thread records",
            )
            assert [t.index for t in threads] == list(range(size))

        def settled() -> tuple[Any, ...] | None:
            header = reader.require_live()
            histograms = reader.histograms()
            figures = (
                header.threads_wanted, header.threads_running, header.workers_alive,
                reader.counters().values.get("messages_in"), histograms["dispatch_latency_ms"].count,
                histograms["write_latency_ms"].count, sum(w.done for w in reader.workers()),
            )  # fmt: skip
            return figures if figures == (3, 3, 2, 24, 24, 24, 24) else None

        wait_for(settled, what="header, counters, histograms and workers after 3 rounds of 8 messages")

        for client in clients[:4]:
            client.close()
        wait_for(lambda: len(reader.connections()) == 4, what="closed connections' slots to be freed")
        assert wait_for(lambda: reader.header().slots_used == 4 or None, what="slots_used 4") is True
    finally:
        for client in clients:
            client.close()
        hammer.stop()
    wait_for(lambda: reader.connections() == [], what="every slot freed")
    reader.close()
    assert hammer.snapshots > 10 and hammer.records > 0


def test_ctl_reads_the_block_not_the_control_socket(start_transport: Any) -> None:
    running = start_transport(workers=1)
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1))
        client.read_response()
        hidden = running.control_path.with_name("control.sock.hidden")
        running.control_path.rename(hidden)  # no control socket any more: stats and connections still answer
        try:
            stats = run_ctl(running, "stats", "--json")
            assert (stats.returncode, stats.stderr) == (0, ""), stats.stderr
            figures = json.loads(stats.stdout)
            assert figures["counters"]["messages_in"] == 1 and figures["connections"] == 1
            assert figures["dispatch_latency_ms"]["count"] == 1
            assert figures["block"]["writer_pid"] == running.process.pid and figures["block"]["writer_alive"]
            listing = run_ctl(running, "connections", "--json")
            assert listing.returncode == 0, listing.stderr
            [info] = json.loads(listing.stdout)["connections"]
            assert (info["remote"], info["messages_in"], info["messages_out"]) == (
                f"127.0.0.1:{client.local_port}", 1, 1,
            )  # fmt: skip
            assert run_ctl(running, "health").returncode == 1  # that one needs the socket
        finally:
            hidden.rename(running.control_path)

        running.process.send_signal(signal.SIGSTOP)  # a transport that answers nothing at all
        try:
            started = time.monotonic()
            frozen = run_ctl(running, "stats", "--json")
            assert time.monotonic() - started < 10.0
            assert frozen.returncode == 0 and json.loads(frozen.stdout)["counters"]["messages_in"] == 1
            assert "last updated its stats" in frozen.stderr and "busy or stuck" in frozen.stderr
        finally:
            running.process.send_signal(signal.SIGCONT)

    assert running.stop() == 0
    gone = run_ctl(running, "stats")
    assert gone.returncode == 1 and "no stats block" in gone.stderr  # unlinked on a clean stop


def test_a_killed_transport_leaves_a_block_flagged_dead(start_transport: Any) -> None:
    running = start_transport(workers=1)
    name = _block_of(running)
    running.process.send_signal(signal.SIGKILL)
    running.process.wait(10)
    try:
        dead = run_ctl(running, "stats", "--json")
        assert dead.returncode == 1
        assert f"the transport (pid {running.process.pid}) that wrote stats block" in dead.stderr
        assert "is gone" in dead.stderr
    finally:
        assert remove_stale_block(name)


def test_each_stage_of_a_message_is_timed_where_its_time_goes(start_transport: Any) -> None:
    """Three pipelined requests to one worker whose router sleeps 50 ms each: routing holds 50 ms per
    message, the second and third wait 50 and 100 ms behind the first, reading and framing take little."""
    running = start_transport(workers=1, router="tests.routers_for_tests:slow")
    stage_names = ("read_framed_ms", "queue_wait_ms", "routing_ms", "write_latency_ms")

    def stages_at(count: int) -> dict[str, Any] | None:
        figures = json.loads(run_ctl(running, "stats", "--json").stdout)
        return figures if all(figures[name]["count"] == count for name in stage_names) else None

    def above(figures: dict[str, Any], name: str, bound_ms: float) -> tuple[int, float]:
        """How many observations of ``name`` exceed ``bound_ms`` (a bucket bound), and the sum of all."""
        at_or_below = next(b["count"] for b in figures[name]["buckets"] if b["le"] == bound_ms)
        return figures[name]["count"] - at_or_below, figures[name]["sum_ms"]

    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1))  # the worker's first message also waits for it to be ready
        client.read_response()
        before = wait_for(lambda: stages_at(1), what="the first message in every stage histogram")
        batch = [sip_request("OPTIONS", cseq, headers=[("X-Sleep", "0.05")]) for cseq in (2, 3, 4)]
        client.send(b"".join(batch))
        for _ in batch:
            client.read_response()
        after = wait_for(lambda: stages_at(4), what="three more messages in every stage histogram")

    def added(name: str, bound_ms: float) -> tuple[int, float]:
        (count_after, sum_after), (count_before, sum_before) = (
            above(after, name, bound_ms),
            above(before, name, bound_ms),
        )
        return count_after - count_before, sum_after - sum_before

    routed, routing_ms = added("routing_ms", 20.0)
    assert routed == 3 and routing_ms >= 150.0
    waited, queue_ms = added("queue_wait_ms", 20.0)
    assert waited == 2 and queue_ms >= 150.0  # 50 and 100 ms behind the first
    assert added("read_framed_ms", 20.0)[0] == 0  # one read framed all three, in microseconds
