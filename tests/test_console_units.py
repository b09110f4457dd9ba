"""The console's pure parts without processes: OTLP decoding, the waterfall, Prometheus text, views, auth, assets."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from prometheus_client.parser import text_string_to_metric_families

from sipwire.console import otlpdecode, tracestore
from sipwire.console.assets import AssetsMissingError, find_assets
from sipwire.console.auth import TOKEN_ENV, AuthSetupError, load_or_generate_token
from sipwire.console.history import error_total, sparkline
from sipwire.console.metrics import render
from sipwire.console.render import format_bytes, format_duration
from sipwire.console.source import Liveness
from sipwire.console.views import histogram_bars
from tests.conftest import REPO

TRACE = bytes(range(16))


def _span(span_id: int, parent: int | None, name: str, start: int, end: int, **extra: object) -> Span:
    return Span(
        trace_id=TRACE,
        span_id=span_id.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=name,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        **extra,  # type: ignore[arg-type]
    )


def test_protobuf_export_decodes_to_spans_with_service_and_attributes() -> None:
    resource = ResourceSpans(
        scope_spans=[
            ScopeSpans(
                spans=[
                    _span(1, None, "sip.receive", 1000, 5000, kind=Span.SPAN_KIND_SERVER),
                    _span(
                        2,
                        1,
                        "sip.route",
                        2000,
                        3000,
                        status=Status(code=Status.STATUS_CODE_ERROR, message="no route"),
                        attributes=[
                            KeyValue(key="sip.method", value=AnyValue(string_value="OPTIONS")),
                            KeyValue(key="n", value=AnyValue(int_value=3)),
                            KeyValue(
                                key="list",
                                value=AnyValue(array_value=ArrayValue(values=[AnyValue(bool_value=True)])),
                            ),
                        ],
                    ),
                ]
            )
        ]
    )
    resource.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="transport")))
    spans = otlpdecode.decode_protobuf(ExportTraceServiceRequest(resource_spans=[resource]).SerializeToString())
    assert [(s.name, s.kind, s.service) for s in spans] == [
        ("sip.receive", "server", "transport"),
        ("sip.route", "unspecified", "transport"),
    ]
    route = spans[1]
    assert route.trace_id == TRACE.hex() and route.parent_id == spans[0].span_id
    assert route.status == "error" and route.status_message == "no route"
    assert dict(route.attributes) == {"sip.method": "OPTIONS", "n": "3", "list": "[True]"}


def test_json_export_accepts_hex_and_base64_ids_and_enum_names() -> None:
    import base64

    body = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": base64.b64encode(TRACE).decode(),
                                "spanId": "0000000000000001",
                                "name": "a",
                                "kind": "SPAN_KIND_CLIENT",
                                "startTimeUnixNano": "10",
                                "endTimeUnixNano": 30,
                                "status": {"code": "STATUS_CODE_OK"},
                                "attributes": [{"key": "k", "value": {"intValue": "7"}}],
                            }
                        ]
                    }
                ]
            }
        ]
    }
    (span,) = otlpdecode.decode_json(json.dumps(body).encode())
    assert span.trace_id == TRACE.hex() and span.kind == "client" and span.status == "ok"
    assert span.service == "unknown service" and span.duration_ms == 20 / 1e6
    assert span.attributes == (("k", "7"),)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"resourceSpans": {}}',
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz", "spanId": "0000000000000001"}]}]}]}',
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "'
        + b"0" * 32
        + b'", "spanId": "0000000000000001"}]}]}]}',
    ],
)
def test_json_garbage_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(otlpdecode.OtlpDecodeError):
        otlpdecode.decode_json(body)


def test_protobuf_garbage_is_a_decode_error() -> None:
    with pytest.raises(otlpdecode.OtlpDecodeError):
        otlpdecode.decode_protobuf(b"\xff\xff\xff\xff")


def _plain(span_id: str, parent: str, start: int, end: int, trace_id: str = TRACE.hex()) -> tracestore.Span:
    return tracestore.Span(trace_id, span_id, parent, f"span-{span_id}", "internal", "svc", start, end, "unset", "", ())


def test_waterfall_orders_children_after_parents_with_offsets() -> None:
    trace = tracestore.Trace(TRACE.hex(), 0.0)
    trace.spans = [
        _plain("c", "b", 60, 80),
        _plain("a", "", 0, 100),
        _plain("b", "a", 10, 90),
        _plain("d", "a", 5, 8),
        _plain("e", "missing-parent", 20, 30),
    ]
    rows = trace.waterfall()
    assert [(r["span"].span_id, r["depth"]) for r in rows] == [("a", 0), ("d", 1), ("b", 1), ("c", 2), ("e", 0)]
    assert rows[3]["offset_pct"] == 60.0 and rows[3]["width_pct"] == 20.0
    assert trace.root.span_id == "a" and trace.duration_ms == 100 / 1e6


def _stats() -> dict[str, object]:
    return {
        "connections": 3,
        "max_connections": 2048,
        "pending_write_bytes": 0,
        "queue_depth": 1,
        "dispatch_in_flight": 2,
        "counters": {"messages_in": 10, 'odd"name\\': 1},
        "tls_handshake_ms": {
            "count": 3,
            "sum_ms": 12.5,
            "buckets": [{"le": 1.0, "count": 1}, {"le": 5.0, "count": 3}, {"le": "+Inf", "count": 3}],
        },
        "workers": [{"index": 0, "pid": 1, "alive": True, "restarts": 0, "in_flight": 2}],
        "threads": [{"index": 0, "connections": 3, "load": 0.25, "queue_depth": 1, "jobs": 9}],
    }


def test_metrics_text_parses_and_escapes_labels() -> None:
    store = tracestore.TraceStore(100)
    text = render(Liveness(True, 0.0, 1, "", 0), {"uptime": 5.0, "started_at": 1.0}, _stats(), {"tcp": 3}, store)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    events = {s.labels["event"]: s.value for s in families["sipwire_events"].samples}
    assert events == {"messages_in": 10, 'odd"name\\': 1}
    histogram = families["sipwire_tls_handshake_seconds"]
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.001": 1, "0.005": 3, "+Inf": 3}
    assert next(s.value for s in histogram.samples if s.name.endswith("_sum")) == 0.0125
    assert families["sipwire_connections_by_transport"].samples[0].labels == {"transport": "tcp"}


def test_metrics_when_down_say_only_that() -> None:
    text = render(Liveness(False, 0.0, None, "gone", 0), None, None, {}, tracestore.TraceStore(100))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["sipwire_transport_up"].samples[0].value == 0
    assert "sipwire_connections" not in families


def test_histogram_bars_are_per_bucket() -> None:
    bars = histogram_bars(_stats()["tls_handshake_ms"])  # type: ignore[arg-type]
    assert [(b["label"], b["count"], b["pct"]) for b in bars["bars"]] == [
        ("≤1ms", 1, 50.0),
        ("≤5ms", 2, 100.0),
        (">5ms", 0, 0.0),
    ]


def test_error_total_counts_failures_only() -> None:
    counters = {
        "write.sent": 100,
        "write.reset": 2,
        "framing_error.too_large": 1,
        "messages_in": 50,
        "lost_messages": 3,
    }
    assert error_total(counters) == 6


def test_sparkline_and_formats() -> None:
    assert sparkline([]) == ""
    assert sparkline([0, 10], width=100, height=10) == "0.0,9.0 100.0,1.0"
    assert format_duration(0.25) == "250ms" and format_duration(75) == "1m 15s" and format_duration(None) == "-"
    assert format_duration(3 * 86400) == "3d 0h"
    assert format_bytes(512) == "512 B" and format_bytes(2048) == "2.0 KiB"


def test_generated_token_file_is_0600_even_if_it_existed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = tmp_path / "dir" / "token"
    path.parent.mkdir()
    path.write_text("old")
    path.chmod(0o644)
    token, written = load_or_generate_token(path)
    assert written == path and path.read_text().strip() == token and len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_generate_token(path)[0] != token, "a fresh token at every start"


def test_token_from_the_environment_must_be_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(AuthSetupError, match="shorter than"):
        load_or_generate_token(tmp_path / "token")
    monkeypatch.setenv(TOKEN_ENV, "a-long-enough-admin-token")
    assert load_or_generate_token(tmp_path / "token") == ("a-long-enough-admin-token", None)
    assert not (tmp_path / "token").exists()


def test_assets_are_found_in_the_checkout_and_missing_htmx_says_npm_ci(tmp_path: Path) -> None:
    assets = find_assets()
    assert assets.root == REPO and (assets.htmx_dist / "htmx.min.js").is_file()
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "base.html").write_text("")
    with pytest.raises(AssetsMissingError, match="npm ci"):
        find_assets(tmp_path)
    with pytest.raises(AssetsMissingError, match="templates not found"):
        find_assets(tmp_path / "templates")


def _stage_histogram(per_bucket: list[int], sum_ms: float, bounds: tuple[float, ...] = (0.1, 1.0)) -> dict[str, Any]:
    """A histogram as the stats view gives it: cumulative buckets, the last one +Inf."""
    from sipwire.transport.statsblock.records import Histogram
    from sipwire.transport.statsblock.views import histogram_view

    return histogram_view(Histogram("", bounds, tuple(per_bucket), sum(per_bucket), sum_ms))


def test_stage_rows_show_the_window_and_fall_back_to_totals_after_a_restart() -> None:
    from sipwire.console.stagesview import stage_rows

    earlier = {"routing_ms": _stage_histogram([10, 0, 0], 0.5)}
    latest = {"routing_ms": _stage_histogram([10, 3, 1], 4.5)}
    [row] = stage_rows(latest, earlier)  # 4 messages in the window: 3 up to 1 ms, 1 above
    assert (row["name"], row["count"], row["mean"], row["p50"], row["p99"]) == ("routing_ms", 4, 1.0, 1.0, "+Inf")
    [alone] = stage_rows(latest, None)
    assert (alone["count"], alone["p50"]) == (14, 0.1)
    restarted = {"routing_ms": _stage_histogram([2, 0, 0], 0.1)}  # fewer than before: a new transport
    [fresh] = stage_rows(restarted, latest)
    assert (fresh["count"], fresh["mean"]) == (2, 0.05)
    assert stage_rows({}, earlier) == []  # no stats block: no stage figures
