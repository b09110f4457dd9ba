"""The worker's side of a message's trace: the ``sip.route`` span.

The transport decided sampling when the message arrived: a MESSAGE record
with a trace context is a sampled trace, one without is not traced at all.
The worker reads the context (W3C ``traceparent``, parsed by hand as the
propagator would: :func:`otel.recorder.parse_traceparent`) and times parse
and routing as the ``sip.route`` span, child of the transport's
``sip.receive``. Every write job submitted meanwhile carries the route
span's ``traceparent`` in its WRITE record; the transport makes the job's
``sip.write`` span its child.

Like the transport's I/O threads, the worker's main loop builds no SDK
span: it records a tuple (:data:`otel.recorder.SpanRecord`) into a bounded
queue, and at the end of each loop pass takes what the queue holds
(:meth:`RouteTracing.batches`, bounded) and sends it to the transport in
SPANS records, with its other records of that pass. The worker has no
telemetry thread and no exporter process: its spans leave through the
transport's, with the rest of their trace. While a router runs, the route
span is the current OpenTelemetry context, and the process's global tracer
provider records finished API spans the same way, so a router's own spans
(``opentelemetry.trace.get_tracer(...).start_as_current_span(...)``) nest
under ``sip.route``.
"""

from __future__ import annotations

import contextlib
import marshal
import time
from collections.abc import Iterator
from typing import Any, Final, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from sipwire.otel import attributes as attr
from sipwire.otel.recorder import SPAN_ROUTE, Endpoints, SpanRecorder, parse_traceparent, traceparent

#: Call-IDs longer than this are cut in the span attribute (a peer could send a huge one).
MAX_CALL_ID_CHARS: Final = 256
#: Spans per SPANS record, and records per loop pass: the rest waits in the bounded queue.
SPANS_PER_BATCH: Final = 256
BATCHES_PER_PASS: Final = 4
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)


class RoutedRecord(Endpoints, Protocol):
    """What a route span reads of a received message's envelope (the transport's ``MessageRecord``)."""

    @property
    def conn_id(self) -> int: ...
    @property
    def trace_context(self) -> str: ...
    @property
    def tls(self) -> str: ...


class RoutedMessage(Protocol):
    """What a route span reads of the parsed message (the transport's ``SipMessage``)."""

    @property
    def is_request(self) -> bool: ...
    @property
    def method(self) -> str: ...
    @property
    def status(self) -> int: ...
    def header(self, name: str) -> str | None: ...


class RouteSpan:
    """A ``sip.route`` span in progress: ids, timing, the message's facts and what routing found."""

    __slots__ = ("attributes", "detail", "error", "parent_id", "record", "span_id", "start_ns", "trace_id")

    def __init__(self, trace_id: int, parent_id: int, span_id: int, record: RoutedRecord) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = span_id
        self.start_ns = time.time_ns()
        self.record = record
        self.attributes: dict[str, str | int] = {}
        self.error = ""
        self.detail = ""

    @property
    def traceparent(self) -> str:
        """The W3C ``traceparent`` naming this span, for the WRITE records of its jobs."""
        return traceparent(self.trace_id, self.span_id).decode("ascii")


class ShippingSpanProcessor(SpanProcessor):
    """Ships spans made with the OpenTelemetry API (a router's own) through the worker's recorder."""

    def __init__(self, recorder: SpanRecorder) -> None:
        self.recorder = recorder

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        parent = span.parent.span_id if span.parent is not None else 0
        self.recorder.put(
            (span.name, span.kind.value, context.trace_id, context.span_id, parent, span.start_time or 0,
             span.end_time or 0, dict(span.attributes or {}), span.status.status_code.value,
             span.status.description or "")
        )  # fmt: skip


class _RouterTracerProvider(TracerProvider):
    """The provider routers get their tracers from; it notes that one was asked for."""

    tracers_given = False

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        self.tracers_given = True
        return super().get_tracer(*args, **kwargs)


class RouteTracing:
    """Makes ``sip.route`` span records; see the module docstring."""

    def __init__(self, recorder: SpanRecorder) -> None:
        self.recorder = recorder
        #: Spans left out because one record alone exceeded a SPANS record's room.
        self.oversize = 0
        #: For routers' own spans: follows the transport's decision, never starts a trace.
        self.provider = _RouterTracerProvider(sampler=ParentBased(ALWAYS_OFF), shutdown_on_exit=False)
        self.provider.add_span_processor(ShippingSpanProcessor(self.recorder))

    def start_route(self, record: RoutedRecord) -> RouteSpan | None:
        """The ``sip.route`` span of ``record``, child of its receive span; None when it carries no sampled context."""
        parent = parse_traceparent(record.trace_context)
        if parent is None:
            return None
        return RouteSpan(parent[0], parent[1], self.recorder.new_span_id(), record)

    def current(self, span: RouteSpan) -> contextlib.AbstractContextManager[None]:
        """Make ``span`` the current OpenTelemetry span while the router runs (its own spans nest under it).

        Only once a router asked the provider for a tracer: making a context current costs about
        30 µs a message, for nothing when no router makes spans of its own.
        """
        return self._current(span) if self.provider.tracers_given else contextlib.nullcontext()

    @staticmethod
    @contextlib.contextmanager
    def _current(span: RouteSpan) -> Iterator[None]:
        context = trace.set_span_in_context(
            NonRecordingSpan(SpanContext(span.trace_id, span.span_id, is_remote=False, trace_flags=_SAMPLED))
        )
        token = otel_context.attach(context)
        try:
            yield
        finally:
            otel_context.detach(token)

    @staticmethod
    def parsed(span: RouteSpan, message: RoutedMessage) -> None:
        attributes = span.attributes
        if message.is_request:
            attributes[attr.SIP_METHOD] = message.method
        else:
            attributes[attr.SIP_STATUS_CODE] = message.status
            cseq = message.header("cseq")
            if cseq:
                attributes[attr.SIP_METHOD] = cseq.rpartition(" ")[2]
        call_id = message.header("call-id")
        if call_id:
            attributes[attr.SIP_CALL_ID] = call_id[:MAX_CALL_ID_CHARS]

    @staticmethod
    def replied(span: RouteSpan, data: bytes) -> None:
        """A response sent while routing a request: its status code goes on the span."""
        if data.startswith(b"SIP/2.0 ") and data[8:11].isdigit():
            span.attributes[attr.SIP_STATUS_CODE] = int(data[8:11])

    @staticmethod
    def failed(span: RouteSpan, error_type: str, detail: str) -> None:
        span.error = error_type
        span.detail = detail

    def end(self, span: RouteSpan) -> None:
        record = span.record
        tls = None
        if record.tls:
            facts = record.tls.split("\t", 2)
            tls = (facts[0], facts[1]) if len(facts) > 1 else None
        self.recorder.put(
            (SPAN_ROUTE, span.trace_id, span.span_id, span.parent_id, span.start_ns, time.time_ns(), record.conn_id,
             record.transport, record.local, record.remote, tls, False, span.error, span.detail,
             span.attributes or None)
        )  # fmt: skip

    def batches(self, max_bytes: int) -> list[tuple[int, bytes]]:
        """What the queue holds, at most ``BATCHES_PER_PASS * SPANS_PER_BATCH`` spans, marshalled: (spans, payload).

        A batch over ``max_bytes`` (a router's span with huge attributes) is split; one record
        alone over it is counted in :attr:`oversize` and left out.
        """
        queue = self.recorder.queue
        out: list[tuple[int, bytes]] = []
        while queue and len(out) < BATCHES_PER_PASS:
            pending = [[queue.popleft() for _ in range(min(len(queue), SPANS_PER_BATCH))]]
            while pending:
                records = pending.pop()
                payload = marshal.dumps(records)
                if len(payload) <= max_bytes:
                    out.append((len(records), payload))
                elif len(records) == 1:
                    self.oversize += 1
                else:
                    half = len(records) // 2
                    pending += [records[half:], records[:half]]
        return out

    def shutdown(self) -> None:
        """End the routers' tracer provider (what the queue holds leaves with the worker's last pass)."""
        self.provider.shutdown()
