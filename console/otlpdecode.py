"""Decoding OTLP trace exports (protobuf or JSON) into the trace store's spans.

The protobuf form is what the OpenTelemetry SDK exporters send
(``application/x-protobuf``); the JSON form follows the OTLP spec (trace and
span ids in hex; base64 is accepted too). Names that repeat in every span
(service, span name, attribute keys) are interned, which keeps a held span
near 2 KiB. Anything that is not an export raises :class:`OtlpDecodeError`
with what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from collections.abc import Mapping
from typing import Any, Final

from sipwire.console.tracestore import Span
from sipwire.errors import ProtocolError

#: Attribute values are cut to this many characters for display.
MAX_ATTRIBUTE_CHARS: Final = 256

SPAN_KINDS: Final = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
STATUS_CODES: Final = {0: "unset", 1: "ok", 2: "error"}
_intern = sys.intern


class OtlpDecodeError(ProtocolError):
    """The body is not an OTLP trace export; the message says what was wrong."""


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
                        name=_intern(span.name),
                        kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                        service=service,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status=STATUS_CODES.get(span.status.code, str(span.status.code)),
                        status_message=span.status.message,
                        attributes=tuple((_intern(kv.key), _cut(_pb_value(kv.value))) for kv in span.attributes),
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
    return _intern(attributes.get("service.name", "") or "unknown service")


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ATTRIBUTE_CHARS else text[: MAX_ATTRIBUTE_CHARS - 1] + "…"


def _checked(spans: list[Span]) -> list[Span]:
    for span in spans:
        if len(span.trace_id) != 32 or span.trace_id == "0" * 32:
            raise OtlpDecodeError(f"span {span.name!r} has an invalid trace id {span.trace_id!r}")
    return spans
