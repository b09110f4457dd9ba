"""What each page shows: plain dictionaries built from the data source and the history.

Routes (:mod:`console.api`, :mod:`console.pages`) pick a template and a
block; the context comes from here, so a page and its htmx partials always
render from the same figures.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from sipwire.console.history import History, Sample, error_total, sparkline
from sipwire.console.source import TransportDownError, TransportRefusedError, TransportSource
from sipwire.console.stagesview import WINDOW_SECONDS as STAGES_WINDOW_SECONDS
from sipwire.console.stagesview import bucket_counts, stage_rows

#: A connection list's transport filter: one of transport.wire.TRANSPORTS, or "" (any: an HTML form's "any").
Proto = Literal["", "tcp", "tls", "ws", "wss"]

#: Sparklines show the last this many samples (one a second).
SPARK_SAMPLES: Final = 180
#: Columns the connections table sorts by (query parameter ``sort``).
SORT_KEYS: Final = (
    "id", "transport", "state", "local", "remote", "thread", "age", "idle", "bytes_in", "bytes_out",
    "messages_in", "messages_out", "pending_write_bytes", "tls_handshake_ms",
)  # fmt: skip
PAGE_SIZES: Final = (25, 50, 100, 250, 500)


@dataclass(frozen=True, slots=True)
class ConnectionQuery:
    state: str | None = None
    proto: str | None = None
    q: str = ""
    sort: str = "id"
    order: str = "asc"
    offset: int = 0
    limit: int = 100


#: Counters of the edge protections (limits hit, peers paused or refused): the overview's "Edge" panel.
EDGE_PREFIXES: Final = (
    "refused.",
    "limited.",
    "paused.",
    "held_messages",
    "router_errors",
    "sip_parse_error.",
    "framing_error.",
    "closed_send_timeout",
    "overload_rejected",
    "ws_handshake_failed.",
    "ws_close.",
    "closed_ws_ping_timeout",
)


def status_context(source: TransportSource, history: History) -> dict[str, Any]:
    """Up/down and since when, for the status pill every page shows."""
    liveness = source.liveness()
    latest = history.latest()
    health = latest.health if latest is not None and latest.up else {}
    return {
        "up": liveness.up,
        "status_for": liveness.for_seconds(),
        "status_error": liveness.error,
        "pid": liveness.pid,
        "health": health,
        "reads_from": source.reads_from,
        "now": time.time(),
    }


def overview_context(source: TransportSource, history: History) -> dict[str, Any]:
    context = status_context(source, history)
    samples = history.samples(SPARK_SAMPLES)
    latest: Sample | None = samples[-1] if samples else None
    context["sample"] = latest
    if latest is None or not latest.up:
        context["stats"] = None
        return context
    stats = latest.stats
    context["stats"] = stats
    context["by_proto"] = latest.by_proto
    context["threads"] = stats.get("threads", [])
    context["workers"] = stats.get("workers", [])
    context["workers_alive"] = sum(1 for w in context["workers"] if w["alive"])
    context["connections_pct"] = _pct(stats["connections"], stats["max_connections"])
    context["histogram"] = histogram_bars(stats.get("tls_handshake_ms") or {})
    context["ws_histogram"] = histogram_bars(stats.get("ws_handshake_ms") or {})
    counters: Mapping[str, int] = stats.get("counters", {})
    context["messages_total"] = counters.get("messages_in", 0)
    context["errors_total"] = error_total(counters)
    context["top_counters"] = sorted(counters.items(), key=lambda item: -item[1])[:12]
    context["edge_counters"] = sorted(
        (name, value) for name, value in counters.items() if name.startswith(EDGE_PREFIXES)
    )
    up_samples = [s for s in samples if s.up]
    context["spark"] = {
        name: {"points": sparkline(values), "now": values[-1] if values else 0, "max": max(values) if values else 0}
        for name, values in (
            ("connections", [s.connections for s in up_samples]),
            ("queue_depth", [s.queue_depth for s in up_samples]),
            ("dispatch_in_flight", [s.dispatch_in_flight for s in up_samples]),
            ("pending_write_bytes", [s.pending_write_bytes for s in up_samples]),
            ("messages", [s.messages_per_second for s in up_samples]),
            ("errors", [s.errors_per_second for s in up_samples]),
        )
    }
    context["spark_seconds"] = round(up_samples[-1].at - up_samples[0].at) if len(up_samples) > 1 else 0
    window = [s for s in up_samples if s.at >= latest.at - STAGES_WINDOW_SECONDS]
    context["stages"] = stage_rows(stats, window[0].stats if len(window) > 1 else None)
    context["stages_seconds"] = round(latest.at - window[0].at) if window else 0
    return context


def histogram_bars(histogram: Mapping[str, Any]) -> dict[str, Any]:
    """Per-bucket (not cumulative) counts with a height in % of the largest bucket."""
    buckets = histogram.get("buckets", [])
    _, counts = bucket_counts(buckets)
    top = max(counts, default=0) or 1
    bars = [
        {"label": _bucket_label(buckets, i), "count": count, "pct": round(100 * count / top, 1)}
        for i, count in enumerate(counts)
    ]
    return {
        "bars": bars,
        "count": histogram.get("count", 0),
        "p50": histogram.get("p50"),
        "p95": histogram.get("p95"),
        "p99": histogram.get("p99"),
    }


def _bucket_label(buckets: Sequence[Mapping[str, Any]], index: int) -> str:
    le = buckets[index]["le"]
    if le == "+Inf":
        return f">{_ms(buckets[index - 1]['le'])}" if index else "all"
    return f"≤{_ms(le)}"


def _ms(value: Any) -> str:
    number = float(value)
    return f"{number / 1000:g}s" if number >= 1000 else f"{number:g}ms"


def _pct(part: float, whole: float) -> float:
    return round(100 * part / whole, 1) if whole else 0.0


def threads_context(source: TransportSource, history: History, error: str = "", notice: str = "") -> dict[str, Any]:
    context = status_context(source, history)
    context["error"] = error
    context["notice"] = notice
    try:
        state = source.threads()
    except (TransportDownError, TransportRefusedError) as failure:
        context.update(pool=None, error=error or str(failure), workers=[])
        return context
    latest = history.latest()
    by_index = {t["index"]: t for t in (latest.stats.get("threads", []) if latest and latest.up else [])}
    for thread in state["threads"]:
        extra = by_index.get(thread["index"], {})
        thread.setdefault("heartbeat_age", extra.get("heartbeat_age"))
        thread.setdefault("pending_write_bytes", extra.get("pending_write_bytes"))
    context["pool"] = state
    context["workers"] = latest.stats.get("workers", []) if latest and latest.up else []
    return context


def select_connections(source: TransportSource, query: ConnectionQuery) -> dict[str, Any]:
    """``{"total", "connections"}`` filtered, sorted and paged as ``query`` asks."""
    if query.sort == "id" and query.order == "asc" and not query.q:
        result = source.connections(query.state, query.proto, limit=query.offset + query.limit)
        return {"total": result["total"], "connections": result["connections"][query.offset :]}
    everything = source.connections(query.state, query.proto, limit=None)["connections"]
    if query.q:
        needle = query.q.lower()
        everything = [
            c
            for c in everything
            if needle in c["remote"].lower() or needle in c["local"].lower() or needle == str(c["id"])
        ]
    everything = sorted(everything, key=lambda c: c[query.sort], reverse=query.order == "desc")
    return {"total": len(everything), "connections": everything[query.offset : query.offset + query.limit]}


def connections_context(source: TransportSource, history: History, query: ConnectionQuery) -> dict[str, Any]:
    context = status_context(source, history)
    context["query"] = query
    context["sort_keys"] = SORT_KEYS
    context["page_sizes"] = PAGE_SIZES
    try:
        selected = select_connections(source, query)
        if not selected["connections"] and selected["total"] and query.offset:
            # Past the end (a filter narrowed the list, or connections closed): show the last page instead.
            query = dataclasses.replace(query, offset=(selected["total"] - 1) // query.limit * query.limit)
            context["query"] = query
            selected = select_connections(source, query)
    except (TransportDownError, TransportRefusedError) as failure:
        context.update(rows=[], total=0, error=str(failure))
        return context
    context["error"] = ""
    context["rows"] = selected["connections"]
    context["total"] = selected["total"]
    context["first"] = query.offset + 1 if selected["connections"] else 0
    context["last"] = query.offset + len(selected["connections"])
    context["prev_offset"] = max(0, query.offset - query.limit) if query.offset else None
    context["next_offset"] = query.offset + query.limit if query.offset + query.limit < selected["total"] else None
    return context
