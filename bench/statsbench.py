"""statsbench: what the shared-memory stats block costs its writers and its readers.

Writer side (the transport's hot path pays only these):
  * one connection slot written (seqlock, CRC, pack of a real ``Connection``): µs, and updates/s;
  * one I/O-thread tick's stats pass over N connections (``IOThread._write_stats``, the code the
    transport runs every 0.25 s): every connection new (slots taken), none changed, 10 % changed;
  * one supervisor write (header, workers, ~60 counters, three histograms).
Reader side:
  * a full snapshot of N used slots (``StatsReader.connections``), the same as JSON-ready dicts
    (what ``sipwire ctl connections --json`` prints), and a whole ``ctl stats`` view; target <= 50 ms
    at 10,000 slots;
  * optionally (``--contended``) the slot snapshot while another process rewrites every slot
    as fast as it can: the seqlock retries it costs.

Everything runs in this process (plus one writer process with ``--contended``) on a private block
that is removed at the end. Standard library plus this repository only.

    python3 bench/statsbench.py                 # 10,000 slots
    python3 bench/statsbench.py --slots 2048 --contended --json /tmp/statsbench.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sipwire.config import Settings  # noqa: E402
from sipwire.transport.connection import Connection, ConnState  # noqa: E402
from sipwire.transport.framing import FramerLimits  # noqa: E402
from sipwire.transport.hub import Hub  # noqa: E402
from sipwire.transport.iothread import IOThread  # noqa: E402
from sipwire.transport.statsblock import (  # noqa: E402
    HANDSHAKE_BUCKETS_MS,
    LATENCY_BUCKETS_MS,
    Capacities,
    HeaderFigures,
    StatsReader,
    StatsWriter,
    connections_view,
    remove_stale_block,
    stats_view,
)
from sipwire.transport.streams import TcpStream  # noqa: E402
from sipwire.transport.tlsinfo import TlsInfo  # noqa: E402


def per_call_us(function: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Mean µs per call over about ``seconds`` (calls batched by 1000 to keep the clock out)."""
    calls = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(1000):
            function()
        calls += 1000
        now = time.perf_counter()
        if now >= deadline:
            return (now - started) / calls * 1e6, calls


def timed_ms(function: Callable[[], object], rounds: int) -> dict[str, float]:
    """Median, min and max wall ms of ``rounds`` calls."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000.0)
    return {"median_ms": round(statistics.median(samples), 3), "min_ms": round(min(samples), 3),
            "max_ms": round(max(samples), 3)}  # fmt: skip


def make_connections(count: int, sock: socket.socket, tls_every: int = 4) -> list[Connection]:
    """``count`` real Connection objects (one shared, never used socket: the stats path never touches it)."""
    limits = FramerLimits(65536, 16384)
    now = time.monotonic()
    conns = []
    for index in range(count):
        transport = "tls" if index % tls_every == 0 else "tcp"
        conn = Connection(
            index + 1, sock, TcpStream(sock), transport, ("127.0.0.1", 5060),
            (f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}", 10000 + index % 50000),
            limits, now,
        )  # fmt: skip
        if transport == "tls":
            conn.set_tls(TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 3.5, "sip.example", "CN=client", ""))
            conn.transition(ConnState.OPEN)
        conn.bytes_in, conn.messages_in = 1000 + index, 10
        conns.append(conn)
    return conns


def bench_writer(writer: StatsWriter, conns: list[Connection], seconds: float) -> dict[str, Any]:
    conn = conns[1]
    slot_us, _ = per_call_us(lambda: writer.write_connection(5, conn, 0), seconds)

    settings = Settings(max_connections=len(conns), workers=2)
    hub = Hub(settings, worker_count=2)
    hub.set_stats(writer)
    thread = IOThread(0, hub)
    try:
        thread.conns = {c.id: c for c in conns}
        now = time.monotonic()
        started = time.perf_counter()
        thread._write_stats(now)  # every connection new: takes a slot and writes it
        first_ms = (time.perf_counter() - started) * 1000.0
        idle = timed_ms(lambda: thread._write_stats(time.monotonic()), 20)  # nothing changed
        tenth = conns[::10]

        def ten_percent_changed() -> None:
            for c in tenth:
                c.bytes_in += 1
            thread._write_stats(time.monotonic())

        busy = timed_ms(ten_percent_changed, 20)

        def all_changed() -> None:
            for c in conns:
                c.bytes_in += 1
            thread._write_stats(time.monotonic())

        everything = timed_ms(all_changed, 5)
    finally:
        thread.selector.close()
        os.close(thread._wake_fd)

    counters = {f"counter.{index}": index for index in range(60)}
    latency_counts = [1] * (len(LATENCY_BUCKETS_MS) + 1)
    handshake_counts = [1] * (len(HANDSHAKE_BUCKETS_MS) + 1)
    figures = HeaderFigures(1, 2, 2, 2, 2, len(conns), len(conns), len(conns), 0, 0, 0, 0, 0, {"tcp": "127.0.0.1:5060"})
    now = time.monotonic()

    def supervisor_write() -> None:
        writer.write_counters(counters)
        writer.write_histogram(0, HANDSHAKE_BUCKETS_MS, handshake_counts, 1.0)
        writer.write_histogram(1, LATENCY_BUCKETS_MS, latency_counts, 1.0)
        writer.write_histogram(2, LATENCY_BUCKETS_MS, latency_counts, 1.0)
        for index in range(2):
            writer.write_worker(index, 1000 + index, True, 0, 5, 0, now, now)
        writer.write_header(figures)

    supervisor_us, _ = per_call_us(supervisor_write, seconds / 2)
    return {
        "slot_write_us": round(slot_us, 3),
        "slot_writes_per_second": round(1e6 / slot_us),
        "tick_connections": len(conns),
        "tick_first_write_ms": round(first_ms, 3),
        "tick_unchanged": idle,
        "tick_unchanged_us_per_connection": round(idle["median_ms"] * 1000.0 / len(conns), 3),
        "tick_10pct_changed": busy,
        "tick_all_changed": everything,
        "tick_all_changed_us_per_connection": round(everything["median_ms"] * 1000.0 / len(conns), 3),
        "tick_cpu_share_all_changed_every_tick": round(everything["median_ms"] / 250.0, 4),
        "supervisor_write_us": round(supervisor_us, 1),
    }


_HAMMER = """
import select, sys, time
sys.path.insert(0, sys.argv[2])
from sipwire.transport.statsblock import StatsReader, StatsWriter, _SLOT
name, slots = sys.argv[1], int(sys.argv[3])
# Attach as a second writer on purpose (a benchmark only): rewrite every slot in a loop.
from sipwire.transport.statsblock import _open_shm, Capacities
reader = StatsReader.open(name)
writer = StatsWriter(_open_shm(name), reader.capacities)
fields = [(i + 1, 3, 1, 0, 0, 5060, 10000, 0, 1.0, 2.0, i, i, 1, 1, 0, 0.0, b"127.0.0.1", b"10.0.0.1",
           b"", b"", b"", b"") for i in range(slots)]
print("ready", flush=True)
n = 0
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not select.select([sys.stdin], [], [], 0)[0]:
    for slot in range(slots):
        writer.write_slot_fields(slot, fields[slot])
    n += slots
print(n, flush=True)
"""


def bench_reader(name: str, rounds: int, contended: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with StatsReader.open(name) as reader:
        records = reader.connections()
        result["slots_used"] = len(records)
        result["snapshot_records"] = timed_ms(reader.connections, rounds)
        result["snapshot_json_dicts"] = timed_ms(lambda: connections_view(reader.connections(), limit=1 << 30), rounds)
        result["ctl_stats_view"] = timed_ms(lambda: stats_view(reader), rounds)
        result["json_bytes"] = len(json.dumps(connections_view(reader.connections(), limit=1 << 30)))
    if contended:
        hammer = subprocess.Popen(
            [sys.executable, "-c", _HAMMER, name, str(REPO), str(result["slots_used"])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert hammer.stdin is not None and hammer.stdout is not None
        try:
            assert hammer.stdout.readline() == "ready\n"
            with StatsReader.open(name) as reader:
                started = time.perf_counter()
                timing = timed_ms(reader.connections, rounds)
                elapsed = time.perf_counter() - started
                counts = reader.counts
            hammer.stdin.write("stop\n")
            hammer.stdin.flush()
            written = int(hammer.stdout.readline())
            hammer.wait(10)
        finally:
            if hammer.poll() is None:
                hammer.kill()
                hammer.wait()
        result["contended_snapshot"] = timing | {
            "retries_per_snapshot": round(counts.retries / rounds, 1),
            "crc_failures": counts.crc_failures,
            "unreadable": counts.unreadable,
            "writer_slot_writes_per_second_meanwhile": round(written / max(elapsed, 1e-9)),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=10_000, help="connection slots, all in use (default 10000)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per per-call measurement")
    parser.add_argument("--rounds", type=int, default=30, help="snapshots timed per reader figure")
    parser.add_argument("--contended", action="store_true", help="also time snapshots against a writer process")
    parser.add_argument("--json", metavar="FILE", help="write the figures here too")
    args = parser.parse_args()

    name = f"sipwire-statsbench.{os.getpid()}"
    capacities = Capacities(threads=8, workers=2, slots=args.slots)
    writer = StatsWriter.create(
        name, capacities, "statsbench", (HANDSHAKE_BUCKETS_MS, LATENCY_BUCKETS_MS, LATENCY_BUCKETS_MS)
    )
    left, right = socket.socketpair()
    try:
        conns = make_connections(args.slots, left)
        figures: dict[str, Any] = {
            "python": sys.version.split()[0],
            "block_bytes": capacities.layout().total,
            "writer": bench_writer(writer, conns, args.seconds),
        }
        figures["reader"] = bench_reader(name, args.rounds, args.contended)
    finally:
        left.close()
        right.close()
        writer.unlink()
        remove_stale_block(name, stale_after=0.0)

    w, r = figures["writer"], figures["reader"]
    print(f"stats block of {args.slots} slots: {figures['block_bytes'] / 1e6:.2f} MB (Python {figures['python']})")
    print("writer")
    print(f"  one slot write                 {w['slot_write_us']:8.2f} us   ({w['slot_writes_per_second']:,}/s)")
    print(f"  tick, {w['tick_connections']} conns, all new     {w['tick_first_write_ms']:8.2f} ms   (slots taken)")
    print(f"  tick, nothing changed          {w['tick_unchanged']['median_ms']:8.2f} ms   "
          f"({w['tick_unchanged_us_per_connection']} us/conn)")  # fmt: skip
    print(f"  tick, 10% changed              {w['tick_10pct_changed']['median_ms']:8.2f} ms")
    print(f"  tick, all changed              {w['tick_all_changed']['median_ms']:8.2f} ms   "
          f"({w['tick_all_changed_us_per_connection']} us/conn; {w['tick_cpu_share_all_changed_every_tick']:.1%} "
          "of a core at 4 ticks/s)")  # fmt: skip
    print(f"  supervisor write (all)         {w['supervisor_write_us']:8.1f} us")
    print("reader")
    print(f"  snapshot, {r['slots_used']} slots (records) {r['snapshot_records']['median_ms']:8.2f} ms median "
          f"(max {r['snapshot_records']['max_ms']:.2f})")  # fmt: skip
    print(f"  snapshot as JSON-ready dicts   {r['snapshot_json_dicts']['median_ms']:8.2f} ms median")
    print(f"  ctl stats view                 {r['ctl_stats_view']['median_ms']:8.2f} ms median")
    if "contended_snapshot" in r:
        c = r["contended_snapshot"]
        print(f"  snapshot vs a writer process   {c['median_ms']:8.2f} ms median, {c['retries_per_snapshot']} "
              f"slot re-reads per snapshot, {c['crc_failures']} CRC failures, {c['unreadable']} unreadable "
              f"(writer: {c['writer_slot_writes_per_second_meanwhile']:,} slot writes/s)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
