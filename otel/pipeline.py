"""From span records to exported spans: the telemetry thread, the delivery, the span assembler.

Theory of operation
    Building SDK spans and, above all, encoding them as OTLP protobuf costs
    tens of microseconds per span in Python, holds the GIL in bursts of a
    whole batch, and was measured to add tens of milliseconds to the p99
    of SIP exchanges when done inside the transport or a worker. So neither
    process exports anything itself:

    1. the I/O threads (or the worker's main loop) append plain tuples to a
       bounded queue (:class:`otel.recorder.SpanRecorder`);
    2. a telemetry thread (:class:`Telemetry`) wakes every
       :data:`DRAIN_SECONDS` (or when the queue is half full), pops what is
       there and hands the batch to a *delivery*;
    3. the production delivery (:class:`otel.shipper.ProcessDelivery`)
       writes the batch, marshalled, to the stdin of an exporter process
       (:mod:`otel.exporter`), one per sipwire process;
    4. the exporter process feeds the records to :class:`SpanAssembler`,
       which builds :class:`~opentelemetry.sdk.trace.ReadableSpan` objects
       and hands them to the SDK's batch span processors (``OTEL_BSP_*``
       apply) and OTLP exporters (:mod:`otel.export`).

    Tests use :class:`LocalDelivery`, which runs the same assembler in
    process. Every queue on the way is bounded; a full one drops and counts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Protocol

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from sipwire.otel import attributes as attr
from sipwire.otel.metrics import TransportMetrics
from sipwire.otel.recorder import (
    SPAN_CONNECT,
    SPAN_HANDSHAKE,
    SPAN_NAMES,
    SPAN_RECEIVE,
    SPAN_ROUTE,
    SPAN_UPGRADE,
    ApiSpanRecord,
    SpanRecord,
    SpanRecorder,
)

log = logging.getLogger("sipwire.telemetry")

#: How often the telemetry thread drains the record queue (it also wakes when the queue is half full).
DRAIN_SECONDS: Final = 0.1
#: Records handed to the delivery per batch (a drain pass may make several batches).
DRAIN_BATCH: Final = 2048
#: A full record queue is reported at most this often (the count is always kept).
DROP_LOG_SECONDS: Final = 60.0

_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_OK: Final = Status(StatusCode.UNSET)
_KINDS: Final = {kind.value: kind for kind in SpanKind}
_STATUS_CODES: Final = {code.value: code for code in StatusCode}


# -- records to SDK spans (the exporter process) ---------------------------------------------------


def build_span(record: SpanRecord, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """One finished SDK span from a recorder tuple (see :data:`otel.recorder.SpanRecord`)."""
    (kind, trace_id, span_id, parent_id, start_ns, end_ns, conn_id, transport, local, remote, tls, outbound, error,
     detail, extra) = record  # fmt: skip
    attributes = attr.connection_attributes(transport, local, remote, outbound, tls) if transport else {}
    if conn_id:
        attributes[attr.CONNECTION_ID] = conn_id
    if kind == SPAN_RECEIVE:
        span_kind = SpanKind.SERVER
    elif kind == SPAN_ROUTE:
        span_kind = SpanKind.INTERNAL
        # Which side is the server depends on who opened the connection, which only the transport knows.
        attributes.pop(attr.SERVER_ADDRESS, None)
        attributes.pop(attr.SERVER_PORT, None)
    elif kind == SPAN_CONNECT:
        span_kind = SpanKind.CLIENT
        attributes.pop(attr.TLS_PROTOCOL_NAME, None)  # the TCP connect precedes TLS
        attributes.pop(attr.TLS_PROTOCOL_VERSION, None)
        attributes.pop(attr.TLS_CIPHER, None)
    elif kind == SPAN_HANDSHAKE:
        span_kind = SpanKind.CLIENT if outbound else SpanKind.SERVER
        attributes[attr.TLS_ESTABLISHED] = not error
    elif kind == SPAN_UPGRADE:
        span_kind = SpanKind.SERVER  # no outbound WebSockets
    else:
        span_kind = SpanKind.PRODUCER
    if extra:
        attributes.update(extra)
    if error:
        attributes[attr.ERROR_TYPE] = error
        status = Status(StatusCode.ERROR, detail or error)
    else:
        status = _OK
    parent = SpanContext(trace_id, parent_id, is_remote=True, trace_flags=_SAMPLED) if parent_id else None
    return ReadableSpan(
        SPAN_NAMES[kind],
        context=SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED),
        parent=parent,
        resource=resource,
        attributes=attributes,
        kind=span_kind,
        status=status,
        start_time=start_ns,
        end_time=max(start_ns, end_ns),
        instrumentation_scope=scope,
    )


def build_api_span(record: ApiSpanRecord, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """A span a router made with the OpenTelemetry API, as the worker shipped it."""
    name, kind, trace_id, span_id, parent_id, start_ns, end_ns, attributes, status_code, description = record
    code = _STATUS_CODES.get(status_code, StatusCode.UNSET)
    parent = SpanContext(trace_id, parent_id, is_remote=False, trace_flags=_SAMPLED) if parent_id else None
    return ReadableSpan(
        name,
        context=SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED),
        parent=parent,
        resource=resource,
        attributes=attributes,  # type: ignore[arg-type]  # plain values, as the SDK gave them
        kind=_KINDS.get(kind, SpanKind.INTERNAL),
        status=Status(code, description or None) if code is StatusCode.ERROR else Status(code),
        start_time=start_ns,
        end_time=max(start_ns, end_ns),
        instrumentation_scope=scope,
    )


class SpanAssembler:
    """Builds spans from shipped records and hands them to span processors (runs in the exporter process)."""

    def __init__(self, processors: Sequence[SpanProcessor], resource: Resource) -> None:
        self.processors = list(processors)
        self.resource = resource
        self.spans = 0
        self.bad_records = 0
        self._scope = InstrumentationScope(attr.SCOPE_NAME, attr.SCOPE_VERSION)

    def feed(self, records: Iterable[Any]) -> None:
        for record in records:
            try:
                if isinstance(record[0], str):
                    span = build_api_span(record, self.resource, self._scope)
                else:
                    span = build_span(record, self.resource, self._scope)
            except (TypeError, ValueError, IndexError, KeyError) as error:
                self.bad_records += 1
                if self.bad_records == 1:
                    log.error("telemetry: cannot build a span from a record (%s); such records are dropped", error)
                continue
            self.spans += 1
            for processor in self.processors:
                processor.on_end(span)

    def shutdown(self, timeout: float) -> None:
        """Export what the processors hold within ``timeout`` seconds, whatever the collector does."""
        run_bounded([p.shutdown for p in self.processors], timeout, "export")


def run_bounded(steps: Sequence[Callable[[], object]], timeout: float, what: str) -> bool:
    """Run ``steps`` on a helper thread; give up waiting after ``timeout`` seconds (the thread is a daemon)."""
    done = threading.Event()

    def run() -> None:
        for step in steps:
            try:
                step()
            except Exception as error:
                log.warning("telemetry: %s step failed: %s", what, error)
        done.set()

    threading.Thread(target=run, name=f"sipwire-telemetry-{what}", daemon=True).start()
    if done.wait(timeout):
        return True
    log.warning("telemetry: %s not finished within %.1fs at shutdown; what is left is dropped", what, timeout)
    return False


# -- deliveries --------------------------------------------------------------------------------------------


class Delivery(Protocol):
    """Where the telemetry thread hands batches of records."""

    def __call__(self, records: list[Any]) -> None: ...

    def start(self) -> None: ...

    def close(self, timeout: float) -> None: ...


class LocalDelivery:
    """Assemble and process the spans in this process (tests; the exporter process itself)."""

    def __init__(self, assembler: SpanAssembler) -> None:
        self.assembler = assembler

    def __call__(self, records: list[Any]) -> None:
        self.assembler.feed(records)

    def start(self) -> None:
        pass

    def close(self, timeout: float) -> None:
        self.assembler.shutdown(timeout)


# -- the telemetry thread (transport and worker) -------------------------------------------------------------


class Telemetry:
    """A process's recorder, the thread that drains it into a delivery, and (transport) its metrics."""

    def __init__(self, recorder: SpanRecorder, delivery: Delivery, metrics: TransportMetrics | None = None) -> None:
        self.recorder = recorder
        self.delivery = delivery
        self.metrics = metrics
        self.shipped = 0
        self._wake = threading.Event()
        self._stopping = False
        self._reported_drops = 0
        self._drop_logged_at = -DROP_LOG_SECONDS
        self._thread = threading.Thread(target=self._run, name="sipwire-telemetry", daemon=True)
        recorder.set_wake(self._wake.set)

    def start(self) -> None:
        if self.recorder.tracing:
            self.delivery.start()
        self._thread.start()

    def statistics(self) -> dict[str, int]:
        """Span records shipped to the exporter, and those dropped because a queue was full."""
        return {"spans": self.shipped, "dropped_queue_full": self.recorder.dropped}

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(DRAIN_SECONDS)
            self._wake.clear()
            self.drain()
        self.drain()

    def drain(self) -> int:
        """Hand what the queue holds (bounded: what was there when called) to the delivery; return how many."""
        recorder = self.recorder
        handshakes = recorder.handshakes
        for _ in range(len(handshakes)):
            seconds, version, error = handshakes.popleft()
            if self.metrics is not None:
                self.metrics.record_handshake(seconds, version, error)
        queue = recorder.queue
        total = 0
        for _ in range(len(queue) // DRAIN_BATCH + 1):
            batch = [queue.popleft() for _ in range(min(len(queue), DRAIN_BATCH))]
            if not batch:
                break
            try:
                self.delivery(batch)
            except Exception:  # a broken delivery must not stop the thread
                log.exception("telemetry: cannot hand %d span records on; dropped", len(batch))
            total += len(batch)
        self.shipped += total
        self._report_drops()
        return total

    def _report_drops(self) -> None:
        dropped = self.recorder.dropped
        now = time.monotonic()
        if dropped > self._reported_drops and now - self._drop_logged_at >= DROP_LOG_SECONDS:
            log.warning(
                "telemetry: span queue full (%d records): %d spans dropped so far", self.recorder.limit, dropped
            )
            self._reported_drops = dropped
            self._drop_logged_at = now

    def shutdown(self, timeout: float) -> None:
        """Drain, let the delivery export what is left and stop, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout / 2)
        steps: list[Callable[[], object]] = [lambda: self.delivery.close(max(0.1, deadline - time.monotonic()))]
        if self.metrics is not None:
            steps.append(self.metrics.shutdown)
        run_bounded(steps, max(0.1, deadline - time.monotonic()), "shutdown")
