"""From span records to exported spans: the telemetry thread, the delivery, the span assembler.

Theory of operation
    Building SDK spans and, above all, encoding them as OTLP protobuf costs
    tens of microseconds per span in Python, holds the GIL in bursts of a
    whole batch, and was measured to add tens of milliseconds to the p99
    of SIP exchanges when done inside the transport or a worker. So no
    process that carries SIP exports anything itself, and an instance has
    one export path:

    1. the transport's I/O threads append plain tuples to a bounded queue
       (:class:`otel.recorder.SpanRecorder`); each worker does the same and
       ships its queue to the transport in SPANS records over its channels,
       which the I/O threads put, undecoded, on the recorder's second
       bounded queue (:meth:`~otel.recorder.SpanRecorder.forward`);
    2. the transport's telemetry thread (:class:`Telemetry`) wakes every
       :data:`DRAIN_SECONDS` (or when a queue is half full), takes both
       queues and hands the batches, marshalled and tagged with the process
       they come from, to a *delivery*;
    3. the production delivery (:class:`otel.shipper.ProcessDelivery`)
       writes them to the stdin of the instance's one exporter process
       (:mod:`otel.exporter`);
    4. the exporter process feeds the records to :class:`SpanAssembler`,
       which builds :class:`~opentelemetry.sdk.trace.ReadableSpan` objects
       with the resource of their process (transport or worker N) and
       exports them in batches (:mod:`otel.export`).

    So Jaeger and the console get every span of a trace from one exporter,
    in the order the transport saw them. Tests use :class:`LocalDelivery`,
    which runs the same assembler in process. Every queue on the way is
    bounded; a full one drops and counts (:meth:`Telemetry.counters`).
"""

from __future__ import annotations

import logging
import marshal
import os
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


#: Where a batch of records comes from: the worker's index (:data:`TRANSPORT_SOURCE` for the transport), its pid.
Source = tuple[int, int]
TRANSPORT_SOURCE: Final = -1


class SpanAssembler:
    """Builds spans from shipped records with the resource of their process, and hands them on.

    ``instance`` names the sipwire instance; each source process gets its own
    resource (``sipwire-transport`` or ``sipwire-worker``, its pid), made once.
    """

    def __init__(self, processors: Sequence[SpanProcessor], instance: str) -> None:
        self.processors = list(processors)
        self.instance = instance
        self.spans = 0
        self.bad_records = 0
        self._scope = InstrumentationScope(attr.SCOPE_NAME, attr.SCOPE_VERSION)
        self._resources: dict[Source, Resource] = {}

    def resource(self, source: Source) -> Resource:
        resource = self._resources.get(source)
        if resource is None:
            worker, pid = source
            if worker == TRANSPORT_SOURCE:
                resource = attr.resource(attr.SERVICE_TRANSPORT, self.instance, pid)
            else:
                resource = attr.resource(attr.SERVICE_WORKER, f"{self.instance}-worker-{worker}", pid)
            if len(self._resources) > 1024:  # restarted workers bring new pids: keep the cache bounded
                self._resources.clear()
            self._resources[source] = resource
        return resource

    def build(self, source: Source, records: Iterable[Any]) -> list[ReadableSpan]:
        """The spans of ``records``; a record that is not one is counted, logged once and left out."""
        resource = self.resource(source)
        spans: list[ReadableSpan] = []
        for record in records:
            try:
                if isinstance(record[0], str):
                    spans.append(build_api_span(record, resource, self._scope))
                else:
                    spans.append(build_span(record, resource, self._scope))
            except (TypeError, ValueError, IndexError, KeyError) as error:
                self.bad_records += 1
                if self.bad_records == 1:
                    log.error("telemetry: cannot build a span from a record (%s); such records are dropped", error)
        self.spans += len(spans)
        return spans

    def feed(self, source: Source, records: Iterable[Any]) -> None:
        """Build and hand the spans to every processor (tests, through :class:`LocalDelivery`)."""
        for span in self.build(source, records):
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


#: A batch on its way to the exporter: its source and the marshalled list of its records.
Batch = tuple[Source, bytes]


class Delivery(Protocol):
    """Where the telemetry thread hands batches of records."""

    def __call__(self, batches: list[Batch], spans: int) -> None: ...

    def statistics(self) -> dict[str, int]:
        """What the delivery and the exporter counted (spans exported, dropped...)."""
        ...

    def start(self) -> None: ...

    def close(self, timeout: float) -> None: ...


class LocalDelivery:
    """Assemble and process the spans in this process (tests; the exporter process itself)."""

    def __init__(self, assembler: SpanAssembler) -> None:
        self.assembler = assembler

    def __call__(self, batches: list[Batch], spans: int) -> None:
        for source, payload in batches:
            self.assembler.feed(source, marshal.loads(payload))

    def statistics(self) -> dict[str, int]:
        return {"exporter_spans_built": self.assembler.spans}

    def start(self) -> None:
        pass

    def close(self, timeout: float) -> None:
        self.assembler.shutdown(timeout)


# -- the telemetry thread (transport and worker) -------------------------------------------------------------


class Telemetry:
    """The transport's recorder, the thread that drains it into the delivery, and its metrics."""

    def __init__(self, recorder: SpanRecorder, delivery: Delivery, metrics: TransportMetrics | None = None) -> None:
        self.recorder = recorder
        self.delivery = delivery
        self.metrics = metrics
        self.shipped = 0
        self.pid = os.getpid()
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
        """Span records shipped to the exporter, and those dropped, at each bounded step."""
        return {
            "spans": self.shipped,
            "dropped_queue_full": self.recorder.dropped,
            "dropped_forward_queue_full": self.recorder.forward_dropped,
            "unsampled_queues_full": self.recorder.shed,
            "unsampled_rate_limit": self.recorder.rate_limited,
            **self.delivery.statistics(),
        }

    def counters(self) -> dict[str, int]:
        """:meth:`statistics` as transport counters (``ctl stats``, the stats block, ``/metrics``)."""
        return {f"telemetry.{name}": value for name, value in self.statistics().items()}

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(DRAIN_SECONDS)
            self._wake.clear()
            self.drain()
        self.drain()

    def drain(self) -> int:
        """Hand what the queues hold (bounded: what was there when called) to the delivery; return how many."""
        recorder = self.recorder
        handshakes = recorder.handshakes
        for _ in range(len(handshakes)):
            seconds, version, error = handshakes.popleft()
            if self.metrics is not None:
                self.metrics.record_handshake(seconds, version, error)
        batches: list[Batch] = []
        spans = 0
        queue = recorder.queue
        own: Source = (TRANSPORT_SOURCE, self.pid)
        for _ in range(len(queue) // DRAIN_BATCH + 1):
            records = [queue.popleft() for _ in range(min(len(queue), DRAIN_BATCH))]
            if not records:
                break
            batches.append((own, marshal.dumps(records)))
            spans += len(records)
        for _ in range(len(recorder.forwarded)):
            forwarded = recorder.take_forwarded()
            if forwarded is None:
                break
            worker, pid, count, payload = forwarded
            batches.append(((worker, pid), payload))
            spans += count
        try:
            self.delivery(batches, spans)  # also when empty: the delivery reads the exporter's totals
        except Exception:  # a broken delivery must not stop the thread
            log.exception("telemetry: cannot hand %d span records on; dropped", spans)
        self.shipped += spans
        self._report_drops()
        return spans

    def _report_drops(self) -> None:
        dropped = self.recorder.dropped + self.recorder.forward_dropped
        now = time.monotonic()
        if dropped > self._reported_drops and now - self._drop_logged_at >= DROP_LOG_SECONDS:
            log.warning(
                "telemetry: span queue full (%d records): %d spans dropped so far (ctl stats: telemetry)",
                self.recorder.limit, dropped,
            )  # fmt: skip
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
