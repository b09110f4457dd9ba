"""The console's OTLP/HTTP trace receiver and the trace API over its store.

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` as protobuf or
OTLP JSON (:mod:`console.otlpdecode`), optionally gzip-compressed. Bodies
over :data:`MAX_BODY_BYTES` (compressed or not) are refused with 413, so a
runaway exporter cannot grow the console. The spans go to the
:class:`~console.tracestore.TraceStore` (assembly, capacity, tail eviction,
retention); ``GET /api/traces`` lists the newest traces (and so pins them
for the retention) and ``GET /api/traces/{trace_id}`` returns one.
"""

from __future__ import annotations

import json
import zlib
from typing import Annotated, Any, Final

from fastapi import APIRouter, Path, Request, Response
from starlette.responses import JSONResponse

from sipwire.console.models import TraceDetail, TraceList, TraceSpan, TraceSummary
from sipwire.console.otlpdecode import OtlpDecodeError, decode_json, decode_protobuf
from sipwire.console.render import Renderer, is_htmx
from sipwire.console.tracestore import Trace, TraceStore, by_start
from sipwire.errors import ProtocolError

#: Largest request body, compressed or decompressed (the SDK batches 512 spans, well under 1 MiB).
MAX_BODY_BYTES: Final = 4 * 1024 * 1024


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
        state=trace.state(),
    )


def detail(trace: Trace) -> TraceDetail:
    spans = [
        TraceSpan(
            span_id=s.span_id, parent_id=s.parent_id, name=s.name, kind=s.kind, service=s.service,
            start_ns=s.start_ns, end_ns=s.end_ns, status=s.status, status_message=s.status_message,
            attributes=dict(s.attributes),
        )
        for s in sorted(trace.spans, key=by_start)
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

    @router.get(
        "/api/traces",
        response_model=TraceList,
        summary="Recent traces held by the OTLP receiver (listed traces stay retrievable for the retention)",
    )
    def list_traces(request: Request) -> Any:
        traces = store.recent(TRACES_LISTED)
        figures = store.figures()
        if is_htmx(request):
            return renderer.block("traces.html", "list", context(request, traces=traces, store=figures))
        return TraceList(
            held=figures["traces"],
            spans=figures["spans"],
            capacity=figures["capacity"],
            retention_seconds=figures["retention"],
            evicted=figures["evicted"],
            traces=[summary(t) for t in traces],
        )

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
