"""Prometheus text exposition (format 0.0.4) of the transport's figures and the console's own.

Written by hand (a few dozen lines) rather than through a client library
registry: the figures are a snapshot the console does not own, so there is
nothing to register, only text to write. Names follow Prometheus practice:
``_total`` for counters, base units (seconds, bytes), labels for thread,
worker, transport and event. Transport counters (``accepted.tcp``,
``framing_error.too_large``...) become one family,
``sipwire_events_total{event="..."}``, so a new counter in the transport
needs no change here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from sipwire.console.source import Liveness
from sipwire.console.stagesview import STAGES
from sipwire.console.tracestore import TraceStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def one(self, name: str, kind: str, text: str, value: float) -> None:
        self.family(name, kind, text, [({}, value)])


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def render(
    liveness: Liveness,
    health: Mapping[str, Any] | None,
    stats: Mapping[str, Any] | None,
    by_proto: Mapping[str, int],
    traces: TraceStore,
) -> str:
    out = _Writer()
    up = liveness.up and health is not None
    out.one("sipwire_transport_up", "gauge", "1 when the transport answers the console, else 0.", 1 if up else 0)
    if health is not None:
        out.one(
            "sipwire_transport_uptime_seconds", "gauge", "Seconds since the transport started.", float(health["uptime"])
        )
        out.one(
            "sipwire_transport_start_time_seconds",
            "gauge",
            "UNIX time the transport started.",
            float(health.get("started_at", 0.0)),
        )
    if stats is not None:
        _transport(out, stats, by_proto)
    _traces(out, traces)
    out.one(
        "sipwire_console_exports_rejected_total",
        "counter",
        "OTLP exports refused (bad body, too large).",
        traces.exports_rejected,
    )
    return "\n".join(out.lines) + "\n"


def _traces(out: _Writer, traces: TraceStore) -> None:
    figures = traces.figures()
    out.one("sipwire_console_traces", "gauge", "Traces held by the console's trace store.", figures["traces"])
    out.one("sipwire_console_spans", "gauge", "Spans held by the console's trace store.", figures["spans"])
    out.one("sipwire_console_spans_capacity", "gauge", "Spans the trace store holds at most.", figures["capacity"])
    out.one("sipwire_console_spans_received_total", "counter", "Spans received on /v1/traces.", traces.spans_received)
    out.one(
        "sipwire_console_spans_dropped_total", "counter", "Spans refused: their trace was full.", traces.spans_dropped
    )
    for name, key, what in (("traces", "evicted", "Traces"), ("spans", "spans_evicted", "Spans")):
        out.family(
            f"sipwire_console_{name}_evicted_total", "counter",
            f"{what} evicted to make room, by reason (tail policy: fast, then slow, then error; pinned: listed).",
            [({"reason": reason}, count) for reason, count in figures[key].items()],
        )  # fmt: skip
    out.one(
        "sipwire_console_trace_pins_refused_total",
        "counter",
        "Listed traces not pinned for the retention: pinned traces already held half the capacity.",
        figures["pins_refused"],
    )


def _transport(out: _Writer, stats: Mapping[str, Any], by_proto: Mapping[str, int]) -> None:
    out.one("sipwire_connections", "gauge", "Open connections.", stats["connections"])
    if by_proto:
        out.family(
            "sipwire_connections_by_transport", "gauge", "Open connections by transport.",
            [({"transport": proto}, count) for proto, count in sorted(by_proto.items())],
        )  # fmt: skip
    out.one("sipwire_max_connections", "gauge", "The max_connections limit.", stats["max_connections"])
    out.one(
        "sipwire_pending_write_bytes",
        "gauge",
        "Bytes queued for sending, all connections.",
        stats["pending_write_bytes"],
    )
    out.one(
        "sipwire_queue_depth", "gauge", "Jobs waiting in the I/O threads' inboxes, all threads.", stats["queue_depth"]
    )
    out.one(
        "sipwire_dispatch_in_flight",
        "gauge",
        "Messages handed to workers and not finished.",
        stats["dispatch_in_flight"],
    )
    threads = stats.get("threads", [])
    out.one("sipwire_io_threads", "gauge", "I/O threads running.", len(threads))
    for name, key, text in (
        ("sipwire_io_thread_load_ratio", "load", "Busy fraction of the I/O thread, 0..1."),
        ("sipwire_io_thread_connections", "connections", "Connections owned by the I/O thread."),
        ("sipwire_io_thread_queue_depth", "queue_depth", "Jobs waiting in the I/O thread's inbox."),
    ):
        out.family(name, "gauge", text, [({"thread": str(t["index"])}, t[key]) for t in threads])
    out.family(
        "sipwire_io_thread_jobs_total", "counter", "Inbox jobs done by the I/O thread.",
        [({"thread": str(t["index"])}, t["jobs"]) for t in threads],
    )  # fmt: skip
    workers = stats.get("workers", [])
    out.family(
        "sipwire_worker_up",
        "gauge",
        "1 when the worker process is alive.",
        [({"worker": str(w["index"])}, 1 if w["alive"] else 0) for w in workers],
    )
    out.family(
        "sipwire_worker_in_flight",
        "gauge",
        "Messages the worker is processing.",
        [({"worker": str(w["index"])}, w["in_flight"]) for w in workers],
    )
    out.family(
        "sipwire_worker_restarts_total",
        "counter",
        "Times the worker was restarted.",
        [({"worker": str(w["index"])}, w["restarts"]) for w in workers],
    )
    out.family(
        "sipwire_events_total", "counter", "Transport counters by event (accepted.tcp, framing_error.*, write.*...).",
        [({"event": name}, value) for name, value in sorted(stats.get("counters", {}).items())],
    )  # fmt: skip
    histogram = stats.get("tls_handshake_ms")
    if histogram:
        _histogram(out, "sipwire_tls_handshake_seconds", "TLS handshake duration (TLS and WSS).", [({}, histogram)])
    histogram = stats.get("ws_handshake_ms")
    if histogram:
        text = "WebSocket upgrade duration (WS from accept, WSS from the end of TLS)."
        _histogram(out, "sipwire_ws_handshake_seconds", text, [({}, histogram)])
    stages = [({"stage": stage}, stats[name]) for name, stage, *_ in STAGES if stage and stats.get(name)]
    if stages:
        text = "Where a message's time goes: read_framed, queue_wait, routing (worker), write (job queued to sent)."
        _histogram(out, "sipwire_message_stage_seconds", text, stages)
    histogram = stats.get("dispatch_latency_ms")
    if histogram:
        text = "A message's round trip through a worker: sent to it until its done count came back."
        _histogram(out, "sipwire_dispatch_seconds", text, [({}, histogram)])


def _histogram(
    out: _Writer, name: str, text: str, series: Iterable[tuple[Mapping[str, str], Mapping[str, Any]]]
) -> None:
    """A histogram family in seconds from stats-block histograms in ms, one series per label set."""
    out.lines.append(f"# HELP {name} {text}")
    out.lines.append(f"# TYPE {name} histogram")
    for labels, histogram in series:
        for bucket in histogram["buckets"]:
            le = "+Inf" if bucket["le"] == "+Inf" else repr(float(bucket["le"]) / 1000.0)
            out.lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {int(bucket['count'])}")
        out.lines.append(f"{name}_count{_labels(labels)} {int(histogram['count'])}")
        if histogram.get("sum_ms") is not None:
            out.lines.append(f"{name}_sum{_labels(labels)} {float(histogram['sum_ms']) / 1000.0!r}")
