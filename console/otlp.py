"""The console's own OTLP/HTTP trace receiver and the bounded store behind the traces page.

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` as protobuf
(``application/x-protobuf``, what the OpenTelemetry SDK exporters send) or
as OTLP JSON (``application/json``; trace and span ids in hex, as the OTLP
spec says, base64 accepted too), optionally gzip-compressed. Bodies over
:data:`MAX_BODY_BYTES` (compressed or not) are refused with 413, so a
runaway exporter cannot grow the console.

:class:`TraceStore` is a ring buffer of whole traces keyed by trace id: a
new trace evicts the oldest one once ``capacity`` traces are held, and one
trace keeps at most :data:`MAX_SPANS_PER_TRACE` spans. Spans of a trace
can arrive in several exports (the transport and each worker export on
their own); they are joined by trace id.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

from fastapi import APIRouter, Path, Request, Response
from starlette.responses import JSONResponse

from sipwire.console.models import TraceDetail, TraceList, TraceSpan, TraceSummary
from sipwire.console.render import Renderer, is_htmx
from sipwire.errors import ProtocolError

#: Largest request body, compressed or decompressed (the SDK batches 512 spans, well under 1 MiB).
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
#: Spans kept per trace: a message's trace has a handful; this only stops a pathological one.
MAX_SPANS_PER_TRACE: Final = 512
#: Attribute values are cut to this many characters for display.
MAX_ATTRIBUTE_CHARS: Final = 256

SPAN_KINDS: Final = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
STATUS_CODES: Final = {0: "unset", 1: "ok", 2: "error"}


class OtlpDecodeError(ProtocolError):
    """The body is not an OTLP trace export; the message says what was wrong."""


@dataclass(frozen=True, slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    service: str
    start_ns: int
    end_ns: int
    status: str
    status_message: str
    attributes: tuple[tuple[str, str], ...]

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6


@dataclass
class Trace:
    trace_id: str
    received_at: float
    spans: list[Span] = field(default_factory=list)

    @property
    def start_ns(self) -> int:
        return min(s.start_ns for s in self.spans)

    @property
    def end_ns(self) -> int:
        return max(s.end_ns for s in self.spans)

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    @property
    def root(self) -> Span:
        ids = {s.span_id for s in self.spans}
        roots = [s for s in self.spans if not s.parent_id or s.parent_id not in ids]
        return min(roots or self.spans, key=lambda s: s.start_ns)

    @property
    def services(self) -> list[str]:
        return sorted({s.service for s in self.spans})

    @property
    def has_error(self) -> bool:
        return any(s.status == "error" for s in self.spans)

    def waterfall(self) -> list[dict[str, Any]]:
        """Spans in tree order (children after their parent, by start), with depth and % offsets."""
        start, total = self.start_ns, max(self.end_ns - self.start_ns, 1)
        ids = {s.span_id for s in self.spans}
        children: dict[str, list[Span]] = {}
        for span in self.spans:
            parent = span.parent_id if span.parent_id in ids else ""
            children.setdefault(parent, []).append(span)
        rows: list[dict[str, Any]] = []
        stack: list[tuple[Span, int]] = [(s, 0) for s in sorted(children.get("", []), key=_by_start, reverse=True)]
        while stack:
            span, depth = stack.pop()
            rows.append(
                {
                    "span": span,
                    "depth": depth,
                    "offset_pct": round(100 * (span.start_ns - start) / total, 3),
                    "width_pct": max(round(100 * (span.end_ns - span.start_ns) / total, 3), 0.3),
                    "offset_ms": round((span.start_ns - start) / 1e6, 3),
                }
            )
            stack.extend(
                (child, depth + 1) for child in sorted(children.get(span.span_id, []), key=_by_start, reverse=True)
            )
        return rows


def _by_start(span: Span) -> int:
    return span.start_ns


class TraceStore:
    """A ring buffer of the most recent traces; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._traces: OrderedDict[str, Trace] = OrderedDict()
        self._lock = threading.Lock()
        self.spans_received = 0
        self.spans_dropped = 0
        self.traces_evicted = 0
        self.exports_received = 0
        self.exports_rejected = 0

    def add(self, spans: Iterable[Span]) -> int:
        """Store ``spans``; returns how many were refused (their trace already held its maximum)."""
        rejected = 0
        now = time.time()
        with self._lock:
            self.exports_received += 1
            for span in spans:
                self.spans_received += 1
                trace = self._traces.get(span.trace_id)
                if trace is None:
                    trace = Trace(span.trace_id, now)
                    self._traces[span.trace_id] = trace
                    while len(self._traces) > self.capacity:
                        self._traces.popitem(last=False)
                        self.traces_evicted += 1
                if len(trace.spans) >= MAX_SPANS_PER_TRACE:
                    rejected += 1
                    continue
                trace.spans.append(span)
            self.spans_dropped += rejected
        return rejected

    def recent(self, limit: int = 100) -> list[Trace]:
        with self._lock:
            traces = list(self._traces.values())
        traces.reverse()
        return traces[:limit]

    def get(self, trace_id: str) -> Trace | None:
        with self._lock:
            trace = self._traces.get(trace_id.lower())
            return None if trace is None else Trace(trace.trace_id, trace.received_at, list(trace.spans))

    def __len__(self) -> int:
        with self._lock:
            return len(self._traces)


# -- decoding ---------------------------------------------------------------------------------------


def decode_protobuf(body: bytes) -> list[Span]:
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]  # noqa: PLC0415
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
        ExportTraceServiceRequest,
    )

    try:
        request = ExportTraceServiceRequest.FromString(body)
    except DecodeError as error:
        raise OtlpDecodeError(f"protobuf body is not an ExportTraceServiceRequest: {error}") from error
    spans: list[Span] = []
    for resource_spans in request.resource_spans:
        service = _service({kv.key: _pb_value(kv.value) for kv in resource_spans.resource.attributes})
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Span(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                        service=service,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status=STATUS_CODES.get(span.status.code, str(span.status.code)),
                        status_message=span.status.message,
                        attributes=tuple((kv.key, _cut(_pb_value(kv.value))) for kv in span.attributes),
                    )
                )
    return _checked(spans)


def _pb_value(value: Any) -> str:
    kind = value.WhichOneof("value")
    if kind is None:
        return ""
    if kind == "array_value":
        return "[" + ", ".join(_pb_value(v) for v in value.array_value.values) + "]"
    if kind == "kvlist_value":
        return "{" + ", ".join(f"{kv.key}={_pb_value(kv.value)}" for kv in value.kvlist_value.values) + "}"
    if kind == "bytes_value":
        return str(value.bytes_value.hex())
    return str(getattr(value, kind))


def decode_json(body: bytes) -> list[Span]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: nested too deep
        raise OtlpDecodeError(f"JSON body does not parse: {error}") from error
    if not isinstance(document, dict):
        raise OtlpDecodeError("JSON body must be an object with resourceSpans")
    spans: list[Span] = []
    try:
        for resource_spans in _list(document, "resourceSpans"):
            resource = resource_spans.get("resource") or {}
            service = _service(_json_attributes(resource.get("attributes")))
            for scope_spans in _list(resource_spans, "scopeSpans"):
                for span in _list(scope_spans, "spans"):
                    status = span.get("status") or {}
                    spans.append(
                        Span(
                            trace_id=_json_id(span.get("traceId"), 16, "traceId"),
                            span_id=_json_id(span.get("spanId"), 8, "spanId"),
                            parent_id=_json_id(span.get("parentSpanId"), 8, "parentSpanId", optional=True),
                            name=str(span.get("name", "")),
                            kind=_enum(span.get("kind", 0), SPAN_KINDS, "SPAN_KIND_"),
                            service=service,
                            start_ns=int(span.get("startTimeUnixNano", 0)),
                            end_ns=int(span.get("endTimeUnixNano", 0)),
                            status=_enum(status.get("code", 0), STATUS_CODES, "STATUS_CODE_"),
                            status_message=str(status.get("message", "")),
                            attributes=tuple((k, _cut(v)) for k, v in _json_attributes(span.get("attributes")).items()),
                        )
                    )
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as error:
        # KeyError: an attribute without "key"; OverflowError: a kind or time of 1e999 (infinity) for int()
        raise OtlpDecodeError(f"JSON body is not an OTLP trace export: {error!r}") from error
    return _checked(spans)


def _list(document: Mapping[str, Any], key: str) -> list[Any]:
    value = document.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise OtlpDecodeError(f"{key} must be a list, got {type(value).__name__}")
    return value


def _json_id(value: Any, size: int, name: str, optional: bool = False) -> str:
    if value in (None, "") and optional:
        return ""
    if not isinstance(value, str):
        raise OtlpDecodeError(f"{name} must be a string, got {value!r}")
    text = value.lower()
    if len(text) == size * 2 and all(c in "0123456789abcdef" for c in text):
        return text
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise OtlpDecodeError(f"{name} {value!r} is neither {size * 2} hex digits nor {size} bytes of base64")
    return raw.hex()


def _json_value(value: Any) -> str:
    if not isinstance(value, dict) or not value:
        return ""
    kind, inner = next(iter(value.items()))
    if kind == "arrayValue":
        return "[" + ", ".join(_json_value(v) for v in (inner or {}).get("values", [])) + "]"
    if kind == "kvlistValue":
        return "{" + ", ".join(f"{k}={v}" for k, v in _json_attributes((inner or {}).get("values")).items()) + "}"
    if kind == "boolValue":
        return "True" if inner else "False"
    return str(inner)


def _json_attributes(items: Any) -> dict[str, str]:
    if not items:
        return {}
    if not isinstance(items, list):
        raise OtlpDecodeError(f"attributes must be a list, got {type(items).__name__}")
    return {str(item["key"]): _json_value(item.get("value")) for item in items}


def _enum(value: Any, names: Mapping[int, str], prefix: str) -> str:
    if isinstance(value, str):
        return value.removeprefix(prefix).lower()
    return names.get(int(value), str(value))


def _service(attributes: Mapping[str, str]) -> str:
    return attributes.get("service.name", "") or "unknown service"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ATTRIBUTE_CHARS else text[: MAX_ATTRIBUTE_CHARS - 1] + "…"


def _checked(spans: list[Span]) -> list[Span]:
    for span in spans:
        if len(span.trace_id) != 32 or span.trace_id == "0" * 32:
            raise OtlpDecodeError(f"span {span.name!r} has an invalid trace id {span.trace_id!r}")
    return spans


# -- the endpoint -----------------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _TooLargeError
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _TooLargeError
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "gzip":
        inflater = zlib.decompressobj(wbits=31)
        try:
            body = inflater.decompress(body, MAX_BODY_BYTES + 1)
        except zlib.error as error:
            raise OtlpDecodeError(f"gzip body does not decompress: {error}") from error
        if len(body) > MAX_BODY_BYTES:
            raise _TooLargeError
    elif encoding not in ("identity", ""):
        raise OtlpDecodeError(f"content-encoding {encoding!r} is not supported: send identity or gzip")
    return body


class _TooLargeError(ProtocolError):
    """A compressed body inflates past the size limit."""


def summary(trace: Trace) -> TraceSummary:
    return TraceSummary(
        trace_id=trace.trace_id,
        received_at=trace.received_at,
        root=trace.root.name,
        services=trace.services,
        span_count=len(trace.spans),
        duration_ms=round(trace.duration_ms, 6),
        error=trace.has_error,
    )


def detail(trace: Trace) -> TraceDetail:
    spans = [
        TraceSpan(
            span_id=s.span_id, parent_id=s.parent_id, name=s.name, kind=s.kind, service=s.service,
            start_ns=s.start_ns, end_ns=s.end_ns, status=s.status, status_message=s.status_message,
            attributes=dict(s.attributes),
        )
        for s in sorted(trace.spans, key=_by_start)
    ]  # fmt: skip
    return TraceDetail(**summary(trace).model_dump(), spans=spans)


_ATTRIBUTES: Final[dict[str, Any]] = {
    "type": "array",
    "items": {"type": "object", "properties": {"key": {"type": "string"}, "value": {"type": "object"}}},
}
#: The request body in the OpenAPI document: the shape of an OTLP export, not its every rule (ids, enums).
EXPORT_CONTENT: Final[dict[str, Any]] = {
    "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {
        "schema": {
            "type": "object",
            "description": "ExportTraceServiceRequest in the OTLP JSON encoding (ids in hex)",
            "properties": {
                "resourceSpans": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "resource": {"type": "object", "properties": {"attributes": _ATTRIBUTES}},
                            "scopeSpans": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "spans": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "properties": {
                                                    "traceId": {"type": "string"},
                                                    "spanId": {"type": "string"},
                                                    "parentSpanId": {"type": "string"},
                                                    "name": {"type": "string"},
                                                    "kind": {"type": "integer"},
                                                    "startTimeUnixNano": {"type": "string"},
                                                    "endTimeUnixNano": {"type": "string"},
                                                    "status": {"type": "object"},
                                                    "attributes": _ATTRIBUTES,
                                                },
                                            },
                                        }
                                    },
                                },
                            },
                        },
                    },
                }
            },
        }
    },
}

#: Traces listed by ``GET /api/traces`` and the traces page.
TRACES_LISTED: Final = 100


def build_router(store: TraceStore, renderer: Renderer, context: Any) -> APIRouter:
    """``POST /v1/traces`` and ``GET /api/traces[/{id}]``; ``context(request, **values)`` is the page context."""
    router = APIRouter(tags=["telemetry"])

    @router.get("/api/traces", response_model=TraceList, summary="Recent traces held by the OTLP receiver")
    def list_traces(request: Request) -> Any:
        traces = store.recent(TRACES_LISTED)
        if is_htmx(request):
            values = {"traces": traces, "held": len(store), "capacity": store.capacity}
            return renderer.block("traces.html", "list", context(request, **values))
        return TraceList(held=len(store), capacity=store.capacity, traces=[summary(t) for t in traces])

    @router.get("/api/traces/{trace_id}", response_model=TraceDetail, responses={404: {"description": "not held"}})
    def get_trace(trace_id: Annotated[str, Path(pattern="^[0-9a-fA-F]{32}$")]) -> Any:
        trace = store.get(trace_id)
        if trace is None:
            return JSONResponse({"detail": f"no trace {trace_id} is held"}, status_code=404)
        return detail(trace)

    @router.post(
        "/v1/traces",
        summary="OTLP/HTTP trace receiver (protobuf or JSON)",
        responses={
            400: {"description": "not an OTLP trace export"},
            413: {"description": "body too large"},
            415: {"description": "not protobuf or JSON"},
        },
        openapi_extra={"requestBody": {"required": True, "content": EXPORT_CONTENT}},
    )
    async def receive_traces(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/x-protobuf", "application/protobuf", "application/json"):
            store.exports_rejected += 1
            return _answer(415, f"content-type {content_type!r} is not application/x-protobuf or application/json")
        try:
            body = await _read_body(request)
            spans = decode_json(body) if content_type == "application/json" else decode_protobuf(body)
        except _TooLargeError:
            store.exports_rejected += 1
            return _answer(413, f"body is larger than {MAX_BODY_BYTES} bytes")
        except OtlpDecodeError as error:
            store.exports_rejected += 1
            return _answer(400, str(error))
        rejected = store.add(spans)
        if content_type == "application/json":
            partial = {"partialSuccess": {"rejectedSpans": rejected}} if rejected else {}
            return Response(json.dumps(partial), media_type="application/json")
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
            ExportTraceServiceResponse,
        )

        answer = ExportTraceServiceResponse()
        if rejected:
            answer.partial_success.rejected_spans = rejected
        return Response(answer.SerializeToString(), media_type="application/x-protobuf")

    return router


def _answer(status: int, message: str) -> Response:
    return Response(json.dumps({"code": status, "message": message}), status_code=status, media_type="application/json")
