"""Log correlation: a log line emitted while a traced message is handled names its trace and span.

The convention is OpenTelemetry's logging one: the record gets
``otelTraceID`` (32 hex digits) and ``otelSpanID`` (16), and the line ends
with `` trace_id=<32 hex> span_id=<16 hex>`` (its first line, when a
traceback follows), so a log search for a trace id finds its lines and a
line leads to its trace (Jaeger, or the console's ``/traces/{trace_id}``).

Whoever handles a traced message says so with :func:`enter` (the worker
while it routes, an I/O thread while it takes a traced write job) and
:func:`leave` after; the ids live in a thread-local. The formatter is
installed only when tracing is on (:func:`install`), so with tracing off
nothing here runs at all; the data path then only skips an ``is None`` test.
"""

from __future__ import annotations

import logging
import threading

from sipwire.otel.recorder import parse_traceparent

_current = threading.local()


def enter(trace_id: int, span_id: int) -> None:
    """Log lines of this thread belong to ``span_id`` of ``trace_id`` until :func:`leave`."""
    _current.ids = (trace_id, span_id)


def enter_context(context: str) -> None:
    """Like :func:`enter`, from a ``traceparent`` (an outcome callback's job context); nothing if empty."""
    ids = parse_traceparent(context) if context else None
    _current.ids = ids


def leave() -> None:
    _current.ids = None


def current() -> tuple[int, int] | None:
    """(trace id, span id) this thread is handling, if any."""
    ids: tuple[int, int] | None = getattr(_current, "ids", None)
    return ids


class CorrelatingFormatter(logging.Formatter):
    """Wraps a handler's formatter: adds the trace and span ids of the thread's current traced message."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        ids = current()
        if ids is None:
            return self.inner.format(record)
        trace_id, span_id = f"{ids[0]:032x}", f"{ids[1]:016x}"
        record.__dict__.update(otelTraceID=trace_id, otelSpanID=span_id)  # for formats that name them
        text = self.inner.format(record)
        first, newline, rest = text.partition("\n")
        return f"{first} trace_id={trace_id} span_id={span_id}{newline}{rest}"


def install(logger: logging.Logger | None = None) -> None:
    """Put the correlating formatter on the handlers of ``logger`` (default: the root logger); idempotent."""
    for handler in (logger or logging.getLogger()).handlers:
        formatter = handler.formatter or logging.Formatter(logging.BASIC_FORMAT)
        if not isinstance(formatter, CorrelatingFormatter):
            handler.setFormatter(CorrelatingFormatter(formatter))
