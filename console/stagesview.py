"""The overview's "Where the time goes" table: each stage of a message, over the last minute.

The stats block's stage histograms (:mod:`sipwire.transport.stages`) count
from the transport's start; an operator wants now. So the table shows the
difference between the latest sample and the one :data:`WINDOW_SECONDS`
before it (the console samples once a second); when the transport restarted
in between (a count went down), the latest figures alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from sipwire.transport.statsblock.records import Histogram
from sipwire.transport.statsblock.views import histogram_view

WINDOW_SECONDS: Final = 60.0

#: (histogram, ``stage`` label in /metrics or "" for none, label on the page, where it runs, what it times),
#: in the order a request crosses them.
STAGES: Final = (
    ("read_framed_ms", "read_framed", "read → framed", "I/O thread",
     "from the read that completed a message (recv, TLS) through framing"),
    ("queue_wait_ms", "queue_wait", "framed → picked up", "worker",
     "checks and encoding, held for fairness, channel backlog, the worker busy, its wake-up"),
    ("routing_ms", "routing", "routing", "worker", "parse and route, write jobs submitted"),
    ("write_latency_ms", "write", "write queued → sent", "I/O thread", "a write job on its connection to its outcome"),
    ("dispatch_latency_ms", "", "dispatch round trip", "both", "sent to a worker until its done count came back"),
)  # fmt: skip


def stage_rows(latest: Mapping[str, Any], earlier: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One row per stage: label, where, what, count, mean and p50/p95/p99 upper bounds (ms) in the window."""
    rows = []
    for name, _, label, where, what in STAGES:
        now = latest.get(name)
        if not now:
            continue
        histogram = _difference(now, earlier.get(name) if earlier else None)
        view = histogram_view(histogram)
        count = view["count"]
        mean = round(histogram.sum_ms / count, 3) if count else None
        rows.append({"name": name, "label": label, "where": where, "what": what, "count": count, "mean": mean} | {
            key: view[key] for key in ("p50", "p95", "p99")
        })  # fmt: skip
    return rows


def _difference(now: Mapping[str, Any], before: Mapping[str, Any] | None) -> Histogram:
    bounds, counts = bucket_counts(now["buckets"])
    sum_ms = float(now.get("sum_ms") or 0.0)
    if before:
        earlier_bounds, earlier_counts = bucket_counts(before["buckets"])
        deltas = [a - b for a, b in zip(counts, earlier_counts, strict=True)] if earlier_bounds == bounds else []
        if deltas and min(deltas) >= 0:  # else the transport restarted: its figures start from zero
            counts = deltas
            sum_ms -= float(before.get("sum_ms") or 0.0)
    return Histogram("", bounds, tuple(counts), sum(counts), max(sum_ms, 0.0))


def bucket_counts(buckets: Sequence[Mapping[str, Any]]) -> tuple[tuple[float, ...], list[int]]:
    """Bounds and per-bucket (not cumulative) counts of a cumulative bucket list."""
    bounds = tuple(float(b["le"]) for b in buckets if b["le"] != "+Inf")
    counts: list[int] = []
    previous = 0
    for bucket in buckets:
        counts.append(int(bucket["count"]) - previous)
        previous = int(bucket["count"])
    return bounds, counts
