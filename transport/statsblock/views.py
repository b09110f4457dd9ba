"""The stats block as plain dicts: what ``sipwire ctl stats/connections --json`` print, and the console serves.

Each view has the shape of the control socket's answer of the same name.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sipwire.transport.connection import ConnectionInfo
from sipwire.transport.statsblock.layout import HISTOGRAM_NAMES
from sipwire.transport.statsblock.reader import StatsReader
from sipwire.transport.statsblock.records import BlockHeader, ConnectionRecord, Histogram

# -- views in the control socket's JSON shape -------------------------------------------------------


def histogram_view(histogram: Histogram) -> dict[str, Any]:
    """Cumulative buckets (Prometheus style), percentiles read off their upper bounds, sum."""
    total = sum(histogram.counts)
    cumulative: list[dict[str, Any]] = []
    running = 0
    for bound, count in zip((*histogram.bounds, "+Inf"), histogram.counts, strict=True):
        running += count
        cumulative.append({"le": bound, "count": running})
    percentiles: dict[str, Any] = {}
    for label, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        rank = fraction * total
        percentiles[label] = next((b["le"] for b in cumulative if total and b["count"] >= rank), None)
    return {"count": total, "sum_ms": round(histogram.sum_ms, 3), "buckets": cumulative, **percentiles}


def stats_view(reader: StatsReader) -> dict[str, Any]:
    """What ``sipwire ctl stats --json`` prints: the control socket's ``stats`` shape, read from the block."""
    header = reader.header()
    now = time.monotonic()
    threads = reader.threads()
    workers = reader.workers()
    counters = reader.counters()
    histograms = reader.histograms()
    empty = Histogram("", (), (0,), 0, 0.0)
    return {
        "connections": header.connections,
        "max_connections": header.max_connections,
        "pending_write_bytes": header.pending_write_bytes,
        "queue_depth": header.queue_depth,
        "dispatch_in_flight": header.dispatch_in_flight,
        "counters": dict(sorted(counters.values.items())),
        "counters_left_out": {"names": counters.dropped_names, "value": counters.dropped_value},
        **{name: histogram_view(histograms.get(name, empty)) for name in HISTOGRAM_NAMES},
        "workers": [
            {
                "index": w.index,
                "pid": w.pid,
                "alive": w.alive,
                "restarts": w.restarts,
                "uptime": round(now - w.started, 3) if w.started else 0.0,
                "in_flight": w.in_flight,
                "done": w.done,
                "heartbeat_age": round(now - w.heartbeat, 3) if w.heartbeat else None,
            }
            for w in workers
        ],
        "threads": [
            {
                "index": t.index,
                "connections": t.connections,
                "load": round(t.load, 4),
                "queue_depth": t.queue_depth,
                "jobs": t.jobs,
                "loop_lag_ms": round(t.loop_lag_ms, 3),
                "pending_write_bytes": t.pending_write_bytes,
                "in_flight": t.in_flight,
                "heartbeat_age": round(now - t.heartbeat, 3),
            }
            for t in threads
        ],
        "block": block_view(header, reader),
    }


def block_view(header: BlockHeader, reader: StatsReader) -> dict[str, Any]:
    return {
        "name": header.name,
        "layout_version": header.layout_version,
        "writer_pid": header.writer_pid,
        "writer_alive": header.writer_alive,
        "status": header.status,
        "updated_age": header.age,
        "stale": header.stale,
        "threads_wanted": header.threads_wanted,
        "threads_running": header.threads_running,
        "slots_used": header.slots_used,
        "slot_capacity": header.capacities.slots,
        "slots_refused": header.slots_refused,
        "thread_records_refused": header.thread_records_refused,
        "read_retries": reader.counts.retries,
        "unreadable_records": reader.counts.unreadable,
    }


def connection_view(record: ConnectionRecord, now: float) -> dict[str, Any]:
    """One connection in the control socket's ``connections`` shape (TLS name and subject cut to fit a slot)."""
    return ConnectionInfo(
        id=record.id,
        state=record.state,
        transport=record.transport,
        local=record.local,
        remote=record.remote,
        thread=record.thread,
        outbound=record.outbound,
        age=round(now - record.created, 3),
        idle=round(now - record.last_activity, 3),
        bytes_in=record.bytes_in,
        bytes_out=record.bytes_out,
        messages_in=record.messages_in,
        messages_out=record.messages_out,
        pending_write_bytes=record.pending_write_bytes,
        in_flight=record.in_flight,
        tls_version=record.tls_version,
        tls_cipher=record.tls_cipher,
        tls_handshake_ms=record.tls_handshake_ms,
        tls_server_name=record.tls_server_name,
        tls_peer_subject=record.tls_peer_subject,
    ).as_dict()


def connections_view(
    records: Iterable[ConnectionRecord], state: str | None = None, transport: str | None = None, limit: int = 1000
) -> dict[str, Any]:
    """``{"total", "connections"}`` sorted by id, filtered like the control socket's ``connections``."""
    now = time.monotonic()
    selected = [
        r for r in records if (state is None or r.state == state) and (transport is None or r.transport == transport)
    ]
    selected.sort(key=lambda r: r.id)
    return {"total": len(selected), "connections": [connection_view(r, now) for r in selected[:limit]]}
