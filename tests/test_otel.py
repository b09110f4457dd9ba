"""OpenTelemetry traces: settings, the I/O threads' recorder, span structure, and a real export over OTLP.

Three layers:

* pure units: the ``OTEL_*`` settings, sampling and ids, the traceparent text
  against the SDK's W3C propagator, the bounded queue, the exporter guard;
* in process: a real I/O thread (its own thread and selector, a real
  listener) and a real worker loop (in a thread of this process) joined by a
  real channel socketpair; the worker's spans ride its channel to the
  transport's telemetry thread, which exports to the SDK's in-memory
  exporter: the whole transport -> worker -> transport path of one message;
* end to end: a transport process with ``OTEL_*`` pointing at an OTLP/HTTP
  receiver run by the test (``http.server`` decoding
  ``ExportTraceServiceRequest``), spans coming from two processes.
"""

from __future__ import annotations

import logging
import marshal
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sipwire.config import Settings
from sipwire.otel import attributes as attr
from sipwire.otel.config import load
from sipwire.otel.export import GuardedSpanExporter
from sipwire.otel.exporter import Batcher, FrameReader, serve
from sipwire.otel.pipeline import TRANSPORT_SOURCE, LocalDelivery, SpanAssembler, Telemetry, build_span
from sipwire.otel.recorder import (
    SPAN_HANDSHAKE,
    SPAN_RECEIVE,
    SpanRecorder,
    parse_traceparent,
    ratio_bound,
    traceparent,
)
from sipwire.otel.shipper import SOURCE
from sipwire.otel.worker import RouteTracing
from sipwire.transport.hub import Hub
from sipwire.transport.iothread import IOThread
from sipwire.transport.resolver import Resolver, ResolverLimits
from sipwire.transport.routers import responder
from sipwire.transport.routing import RouteContext, Router
from sipwire.transport.sip import SipMessage
from sipwire.transport.sipresponse import build_response
from sipwire.transport.worker import CONTROL, CONTROL_ADD_CHANNEL, CONTROL_STOP, Worker
from tests.conftest import REPO, RunningTransport, SipClient, sip_request, wait_for
from tests.wsclient import RawWs, parse_response, sip_over_ws, ws_connect

StartTransport = Callable[..., RunningTransport]

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


# -- settings ------------------------------------------------------------------------------------------------


def test_nothing_configured_means_off() -> None:
    config = load({})
    assert not config.tracing
    assert not config.metrics
    assert not config.enabled
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("environ", "traces", "metrics"),
    [
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",), ()),
        ({"OTEL_TRACES_EXPORTER": "console, otlp,otlp"}, ("console", "otlp"), ()),
        ({"OTEL_TRACES_EXPORTER": "none"}, (), ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ("otlp",), ()),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, ("otlp",), ()),
        # An endpoint does not override an explicit "none".
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, (), ()),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, (), ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4318/v1/metrics"}, (), ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, (), ()),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, ("otlp",), ()),
    ],
)
def test_exporters_from_the_environment(
    environ: dict[str, str], traces: tuple[str, ...], metrics: tuple[str, ...]
) -> None:
    config = load(environ)
    assert config.traces_exporters == traces
    assert config.metrics_exporters == metrics
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("sampler", "argument", "ratio"),
    [
        ("", "", 1.0),
        ("always_on", "", 1.0),
        ("parentbased_always_on", "", 1.0),
        ("always_off", "", 0.0),
        ("parentbased_always_off", "", 0.0),
        ("traceidratio", "0.1", 0.1),
        ("parentbased_traceidratio", "0.25", 0.25),
        ("traceidratio", "", 1.0),
        ("TraceIdRatio", "0", 0.0),
    ],
)
def test_root_sampling_ratio(sampler: str, argument: str, ratio: float) -> None:
    config = load({"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": argument})
    assert config.root_ratio == ratio
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("environ", "warning"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER='jaeger_remote' is not a known sampler"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "not a probability"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, "not a probability"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "exporter 'zipkin' is not supported here"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not supported"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "-3"}, "OTEL_BSP_MAX_QUEUE_SIZE='-3' is not a positive integer"),
    ],
)
def test_bad_values_warn_and_fall_back(environ: dict[str, str], warning: str) -> None:
    config = load(environ)
    assert len(config.warnings) == 1
    assert warning in config.warnings[0]
    assert config.root_ratio == 1.0
    assert config.traces_protocol == "http/protobuf"
    assert config.queue_size == 2048


def test_protocol_per_signal_overrides_the_shared_one() -> None:
    config = load({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"})
    assert config.traces_protocol == "grpc"
    assert config.metrics_protocol == "http/protobuf"


# -- ids, sampling and traceparent ------------------------------------------------------------------------


def test_traceparent_is_what_the_w3c_propagator_reads() -> None:
    text = traceparent(TRACE_ID, SPAN_ID).decode("ascii")
    assert text == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    context = get_current_span(TraceContextTextMapPropagator().extract({"traceparent": text})).get_span_context()
    assert (context.trace_id, context.span_id, context.trace_flags.sampled) == (TRACE_ID, SPAN_ID, True)
    assert parse_traceparent(text) == (TRACE_ID, SPAN_ID)


def test_what_the_w3c_propagator_writes_is_parsed() -> None:
    provider = TracerProvider()
    span = provider.get_tracer("t").start_span("s")
    carrier: dict[str, str] = {}
    from opentelemetry.trace import set_span_in_context

    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    context = span.get_span_context()
    assert parse_traceparent(carrier["traceparent"]) == (context.trace_id, context.span_id)
    span.end()
    provider.shutdown()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",  # not sampled
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has no more fields
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    ],
)
def test_invalid_or_unsampled_traceparent_is_not_traced(text: str) -> None:
    assert parse_traceparent(text) is None
    assert SpanRecorder(1.0, 10).start_write(text) is None


def test_a_later_version_with_more_fields_is_accepted() -> None:
    assert parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever") == (
        TRACE_ID,
        SPAN_ID,
    )


def test_ratio_zero_makes_no_trace_and_one_makes_every_trace() -> None:
    never, always = SpanRecorder(0.0, 10), SpanRecorder(1.0, 10)
    for _ in range(2000):
        assert never.root_trace_id() == 0
        trace_id = always.root_trace_id()
        assert 0 < trace_id < 1 << 128
        assert trace_id >> 64  # the high half is never zero either


def test_ratio_sampling_keeps_about_the_ratio_and_agrees_with_the_sdk() -> None:
    random.seed(20260411)
    recorder = SpanRecorder(0.1, 10)
    sdk = TraceIdRatioBased(0.1)
    assert sdk.bound == ratio_bound(0.1)
    draws = 20_000
    kept = [trace_id for trace_id in (recorder.root_trace_id() for _ in range(draws)) if trace_id]
    assert 0.08 * draws < len(kept) < 0.12 * draws
    for trace_id in kept[:500]:
        assert sdk.should_sample(None, trace_id, "sip.receive").decision is Decision.RECORD_AND_SAMPLE


def test_full_queue_drops_and_counts() -> None:
    woken: list[int] = []
    recorder = SpanRecorder(1.0, 4)
    recorder.set_wake(lambda: woken.append(len(recorder.queue)))
    record = (
        SPAN_RECEIVE, 1, 2, 0, 10, 20, 1, "tcp", ("127.0.0.1", 5060), ("127.0.0.1", 40000), None, False, "", "", None
    )  # fmt: skip
    for _ in range(7):
        recorder.put(record)
    assert len(recorder.queue) == 4
    assert recorder.dropped == 3
    assert woken == [2]  # once, at half the limit
    for _ in range(6):
        recorder.handshake(0.001, "TLSv1.3", "")
    assert len(recorder.handshakes) == 4
    assert recorder.dropped == 5


def test_the_rate_limit_bounds_traces_started_per_second() -> None:
    recorder = SpanRecorder(1.0, 1024, rate_limit=5)
    for _ in range(20):  # a run of draws inside one second of the monotonic clock
        second = int(time.monotonic())
        started = [recorder.root_trace_id() for _ in range(8)]
        if int(time.monotonic()) == second:
            break
        time.sleep(0.01)
    else:
        pytest.fail("no eight draws within one second")
    assert [bool(trace_id) for trace_id in started].count(True) <= 5
    assert recorder.rate_limited >= 3
    unlimited = SpanRecorder(1.0, 1024)
    assert all(unlimited.root_trace_id() for _ in range(100)) and unlimited.rate_limited == 0


def test_nearly_full_queues_stop_new_traces_until_they_drain() -> None:
    recorder = SpanRecorder(1.0, 8)
    record = (SPAN_RECEIVE, 1, 2, 0, 10, 20, 1, "tcp", None, None, None, False, "", "", None)
    assert recorder.root_trace_id()
    for _ in range(6):  # three quarters of the limit
        recorder.put(record)
    assert [recorder.root_trace_id() for _ in range(3)] == [0, 0, 0]
    assert recorder.shed == 3 and recorder.dropped == 0
    recorder.queue.clear()
    recorder.forward(0, 1, 6, b"x")  # workers' batches count as well
    assert recorder.root_trace_id() == 0 and recorder.shed == 4
    recorder.take_forwarded()
    assert recorder.root_trace_id()


def test_forwarded_worker_batches_are_bounded_in_spans_and_dropped_whole() -> None:
    recorder = SpanRecorder(1.0, 100)
    recorder.forward(0, 11, 60, b"a")
    recorder.forward(1, 12, 50, b"b")  # 110 > 100: this batch is dropped, whole, and counted
    recorder.forward(1, 12, 40, b"c")
    assert (recorder.forwarded_spans, recorder.forward_dropped) == (100, 50)
    assert recorder.take_forwarded() == (0, 11, 60, b"a")
    assert recorder.forwarded_spans == 40
    recorder.forward(0, 11, 60, b"d")
    assert [recorder.take_forwarded(), recorder.take_forwarded(), recorder.take_forwarded()] == [
        (1, 12, 40, b"c"), (0, 11, 60, b"d"), None,
    ]  # fmt: skip


def test_a_worker_ships_bounded_batches_and_counts_a_span_too_large_for_one() -> None:
    tracing = RouteTracing(SpanRecorder(1.0, 2048))
    record = (SPAN_RECEIVE, 1, 2, 0, 10, 20, 1, "tcp", None, None, None, False, "", "", None)
    huge = (SPAN_RECEIVE, 1, 3, 0, 10, 20, 1, "tcp", None, None, None, False, "", "", {"x": "y" * 5000})
    for _ in range(1100):
        tracing.recorder.put(record)
    tracing.recorder.put(huge)
    batches = tracing.batches(4000)  # room for fewer than 256 small records: batches are split
    assert all(len(payload) <= 4000 for _, payload in batches)
    assert sum(count for count, _ in batches) == sum(len(marshal.loads(payload)) for _, payload in batches)
    shipped = sum(count for count, _ in batches)
    assert 0 < shipped <= 4 * 256
    while tracing.recorder.queue:
        shipped += sum(count for count, _ in tracing.batches(4000))
    assert shipped == 1100 and tracing.oversize == 1


# -- spans built from records -------------------------------------------------------------------------------


def test_handshake_span_has_tls_attributes_and_error_status() -> None:
    resource = attr.resource(attr.SERVICE_TRANSPORT, "test")
    info = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    scope = InstrumentationScope(attr.SCOPE_NAME, attr.SCOPE_VERSION)
    ok = build_span(
        (SPAN_HANDSHAKE, TRACE_ID, SPAN_ID, 0, 100, 200, 7, "tls", ("127.0.0.1", 5061), ("127.0.0.1", 40001), info,
         False, "", "", None),
        resource,
        scope,
    )  # fmt: skip
    assert ok.name == "tls.handshake"
    assert ok.kind is SpanKind.SERVER
    assert ok.parent is None
    assert ok.status.status_code is StatusCode.UNSET
    assert ok.attributes is not None
    assert dict(ok.attributes) == {
        "network.transport": "tcp",
        "network.protocol.name": "sip",
        "sip.transport": "tls",
        "network.peer.address": "127.0.0.1",
        "network.peer.port": 40001,
        "network.local.address": "127.0.0.1",
        "network.local.port": 5061,
        "server.address": "127.0.0.1",
        "server.port": 5061,
        "tls.protocol.name": "tls",
        "tls.protocol.version": "1.3",
        "tls.cipher": "TLS_AES_256_GCM_SHA384",
        "tls.established": True,
        "sipwire.connection.id": 7,
    }
    failed = build_span(
        (SPAN_HANDSHAKE, TRACE_ID, SPAN_ID, 5, 100, 200, 8, "tls", ("127.0.0.1", 40002), ("127.0.0.1", 5061), None,
         True, "name_mismatch", "certificate names other.example", None),
        resource,
        scope,
    )  # fmt: skip
    assert failed.kind is SpanKind.CLIENT
    assert failed.parent is not None and failed.parent.span_id == 5
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "certificate names other.example"
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "name_mismatch"
    assert failed.attributes["tls.established"] is False
    assert failed.attributes["server.port"] == 5061  # outbound: the peer is the server


# -- the exporter process's input ------------------------------------------------------------------------------


def _frame(records: list[Any], source: tuple[int, int] = (TRANSPORT_SOURCE, 4242)) -> bytes:
    body = SOURCE.pack(*source) + marshal.dumps(records)
    return len(body).to_bytes(4, "big") + body


def _serve(data: bytes, exporter: InMemorySpanExporter, batch: int = 512) -> int:
    """Run the exporter process's loop on ``data`` (written to a pipe, then closed) into ``exporter``."""
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, data), os.close(write_end)), daemon=True)
    writer.start()
    try:
        batcher = Batcher([exporter], batch, 0.05)
        frames = serve(FrameReader(read_end), SpanAssembler([], "t"), batcher)
        batcher.export_due(everything=True)
    finally:
        writer.join(5.0)
        os.close(read_end)
    return frames


def test_exporter_reads_frames_until_the_stream_ends() -> None:
    exporter = InMemorySpanExporter()
    receive = (
        SPAN_RECEIVE, TRACE_ID, SPAN_ID, 0, 10, 20, 3, "tls", ("127.0.0.1", 5061), ("127.0.0.1", 40000),
        ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"), False, "", "", None,
    )  # fmt: skip
    api = ("lookup", SpanKind.CLIENT.value, TRACE_ID, 0x1234, SPAN_ID, 30, 40, {"db.system": "sqlite"}, 2, "boom")
    data = _frame([receive]) + _frame([api, receive], (2, 777)) + _frame([])[:3]  # the last one is cut short
    assert _serve(data, exporter) == 2
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["sip.receive", "lookup", "sip.receive"]
    assert spans[0].resource.attributes["process.pid"] == 4242
    assert spans[0].resource.attributes["service.name"] == "sipwire-transport"
    assert spans[0].attributes is not None and spans[0].attributes["tls.protocol.version"] == "1.2"
    lookup = spans[1]
    # A worker's batch carries its own resource: service, instance and pid of that worker.
    assert lookup.resource.attributes["service.name"] == "sipwire-worker"
    assert lookup.resource.attributes["service.instance.id"] == "t-worker-2-777"
    assert lookup.parent is not None and lookup.parent.span_id == SPAN_ID
    assert lookup.kind is SpanKind.CLIENT
    assert lookup.status.status_code is StatusCode.ERROR and lookup.status.description == "boom"
    assert lookup.attributes is not None and lookup.attributes["db.system"] == "sqlite"


def test_exporter_sends_full_batches_at_once_and_the_rest_after_the_delay() -> None:
    exporter = InMemorySpanExporter()
    record = (SPAN_RECEIVE, TRACE_ID, SPAN_ID, 0, 10, 20, 3, "tcp", None, None, None, False, "", "", None)
    batcher = Batcher([exporter], 4, 0.2)
    batcher.add(SpanAssembler([], "t").build((TRANSPORT_SOURCE, 1), [record] * 6))
    batcher.export_due()
    assert len(exporter.get_finished_spans()) == 4  # one full batch; two spans wait for the delay
    assert batcher.timeout() is not None
    time.sleep(0.25)
    batcher.export_due()
    assert len(exporter.get_finished_spans()) == 6
    assert (batcher.exported, batcher.failed, batcher.timeout()) == (6, 0, None)


@pytest.mark.parametrize(
    "data",
    [
        (1 << 30).to_bytes(4, "big") + b"x",  # a length over the frame limit
        (13).to_bytes(4, "big") + SOURCE.pack(-1, 1) + b"\xff\xff\xff\xff\xff",  # not marshal data
        (3).to_bytes(4, "big") + b"abc",  # no room for the source
    ],
    ids=["oversize", "garbage", "no-source"],
)
def test_exporter_stops_on_a_corrupt_stream(data: bytes) -> None:
    exporter = InMemorySpanExporter()
    assert _serve(_frame([]) + data + _frame([]), exporter) == 1
    assert exporter.get_finished_spans() == ()


def test_a_bad_record_is_dropped_and_the_rest_exported(caplog: pytest.LogCaptureFixture) -> None:
    exporter = InMemorySpanExporter()
    assembler = SpanAssembler([SimpleSpanProcessor(exporter)], "t")
    good = (SPAN_RECEIVE, TRACE_ID, SPAN_ID, 0, 10, 20, 3, "tcp", None, None, None, False, "", "", None)
    assembler.feed((TRANSPORT_SOURCE, 1), [(1, 2), good, ("x",), good])
    assert len(exporter.get_finished_spans()) == 2
    assert assembler.bad_records == 2
    assert caplog.text.count("cannot build a span") == 1


# -- metrics -------------------------------------------------------------------------------------------------


def test_metrics_read_the_transport_statistics_with_units() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint

    from sipwire.otel.metrics import TransportMetrics

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    statistics = {
        "connections": 3,
        "pending_write_bytes": 120,
        "counters": {
            "accepted.tcp": 5,
            "accepted.tls": 1,
            "accepted.wss": 2,
            "connects": 2,
            "messages_in": 40,
            "lost_messages": 1,
            "write.sent": 38,
            "write.refused": 2,
            "refused.max_connections": 4,
        },
    }
    metrics = TransportMetrics(provider, lambda: statistics)
    metrics.record_handshake(0.0015, "TLSv1.3", "")
    metrics.record_handshake(0.2, "", "timeout")
    data = reader.get_metrics_data()
    assert data is not None
    found = {
        metric.name: metric
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }

    def points(name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        result = {}
        for point in found[name].data.data_points:
            key = tuple(sorted((point.attributes or {}).items()))
            result[key] = point.sum if isinstance(point, HistogramDataPoint) else point
        return result

    assert {name: found[name].unit for name in found} == {
        "sipwire.active_connections": "{connection}",
        "sipwire.connections.opened": "{connection}",
        "sipwire.rejected_connections": "{connection}",
        "sipwire.messages.received": "{message}",
        "sipwire.messages.lost": "{message}",
        "sipwire.write_jobs": "{job}",
        "sipwire.pending_write_bytes": "By",
        "sipwire.tls_handshake.duration": "s",
    }

    def value(name: str, **attributes: Any) -> Any:
        point = points(name)[tuple(sorted(attributes.items()))]
        assert isinstance(point, NumberDataPoint)
        return point.value

    assert value("sipwire.active_connections") == 3
    assert value("sipwire.pending_write_bytes") == 120
    assert value("sipwire.messages.received") == 40
    assert value("sipwire.messages.lost") == 1
    assert value("sipwire.connections.opened", **{"sip.transport": "tls", "sipwire.connection.direction": "inbound"})
    for transport, opened in (("wss", 2), ("ws", 0)):
        inbound = {"sip.transport": transport, "sipwire.connection.direction": "inbound"}
        assert value("sipwire.connections.opened", **inbound) == opened
    assert value("sipwire.connections.opened", **{"sipwire.connection.direction": "outbound"}) == 2
    assert value("sipwire.rejected_connections", **{"error.type": "max_connections"}) == 4
    assert value("sipwire.write_jobs", **{"sipwire.write.outcome": "sent"}) == 38
    assert value("sipwire.write_jobs", **{"sipwire.write.outcome": "refused", "error.type": "refused"}) == 2
    handshakes = points("sipwire.tls_handshake.duration")
    assert handshakes[(("tls.protocol.version", "1.3"),)] == pytest.approx(0.0015)
    assert handshakes[(("error.type", "timeout"),)] == pytest.approx(0.2)
    provider.shutdown()


def test_metrics_keep_the_last_figures_when_statistics_fail(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from sipwire.otel.metrics import TransportMetrics

    answers: list[dict[str, Any] | None] = [{"connections": 7, "counters": {}}, None, None]

    def read() -> dict[str, Any]:
        answer = answers.pop(0)
        if answer is None:
            raise TimeoutError("an I/O thread did not answer within 2.0s")
        return answer

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    metrics = TransportMetrics(provider, read)
    for _ in range(3):
        metrics._cached_at = -10.0  # each collection reads afresh
        data = reader.get_metrics_data()
        assert data is not None
        [active] = [
            m
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == "sipwire.active_connections"
        ]
        assert [p.value for p in active.data.data_points] == [7]  # type: ignore[union-attr]
    assert caplog.text.count("cannot read transport statistics") == 1
    provider.shutdown()


# -- the exporter guard --------------------------------------------------------------------------------------


def test_exporter_failures_are_logged_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a loopback port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    guard = GuardedSpanExporter(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=0.5), "test")
    span = ReadableSpan("s", start_time=1, end_time=2)
    caplog.set_level(logging.INFO, logger="sipwire.telemetry")
    started = time.monotonic()
    for _ in range(3):
        assert guard.export([span]) is SpanExportResult.FAILURE
    assert time.monotonic() - started < 5.0
    warnings = [r for r in caplog.records if r.name == "sipwire.telemetry" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "exporting spans to test failed" in warnings[0].getMessage()
    assert guard.outage.failed_batches == 3
    assert guard.outage.failed_items == 3
    guard.shutdown()


def test_an_exporter_that_raises_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(InMemorySpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            raise RuntimeError("collector client exploded")

    guard = GuardedSpanExporter(Broken(), "broken")
    caplog.set_level(logging.INFO, logger="sipwire.telemetry")
    assert guard.export([ReadableSpan("s", start_time=1, end_time=2)]) is SpanExportResult.FAILURE
    assert "RuntimeError: collector client exploded" in caplog.text


# -- in process: a real I/O thread and a real worker loop ---------------------------------------------------


@dataclass
class InProcess:
    """An I/O thread and a worker loop of this process, joined by a channel, exporting to memory."""

    port: int
    exported: InMemorySpanExporter
    telemetry: Telemetry | None
    tracing: RouteTracing

    def spans(self) -> list[ReadableSpan]:
        """What reached the in-memory exporter (the telemetry thread ships every 0.1 s)."""
        return list(self.exported.get_finished_spans())

    def exchange(self, request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as sock:
            client = SipClient(sock)
            client.send(request)
            return client.read_response().raw


def echo_trace_context(message: SipMessage, ctx: RouteContext) -> None:
    """Answer 200 with the trace context the worker got, in ``X-Trace``."""
    if message.is_request and message.method != "ACK":
        extra = [("X-Trace", ctx.envelope.trace_context or "-")]
        ctx.reply(build_response(message, 200, "OK", extra_headers=extra, via_source=ctx.envelope.remote))


@pytest.fixture
def in_process() -> Iterator[Callable[..., InProcess]]:
    stops: list[Callable[[], None]] = []

    def start(route: Router = responder.route, ratio: float | None = 1.0) -> InProcess:
        settings = Settings()
        hub = Hub(settings, worker_count=1)
        exported = InMemorySpanExporter()
        telemetry = None
        if ratio is not None:
            recorder = SpanRecorder(ratio, 1024)
            assembler = SpanAssembler([SimpleSpanProcessor(exported)], "t")
            telemetry = Telemetry(recorder, LocalDelivery(assembler))
            telemetry.start()
            hub.recorder = recorder
        thread = IOThread(0, hub)
        hub.threads = (thread,)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        thread.post("add_listener", listener, "tcp")
        transport_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        thread.post("add_channel", 0, transport_end)
        tracing = RouteTracing(SpanRecorder(1.0, 1024))
        control_transport, control_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Telemetry off (ratio None): the worker has no tracing either.
        worker = Worker(
            0,
            control_worker,
            route,
            Resolver(ResolverLimits.from_settings(settings)),
            tracing if ratio is not None else None,
        )
        socket.send_fds(control_transport, [CONTROL.pack(CONTROL_ADD_CHANNEL, 0)], [worker_end.fileno()])
        worker_end.close()
        worker_thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
        thread.start()
        worker_thread.start()

        def stop() -> None:
            thread.post("shutdown", 0.5)
            thread.thread.join(5.0)
            control_transport.send(CONTROL.pack(CONTROL_STOP, 0))
            worker_thread.join(5.0)
            control_transport.close()
            control_worker.close()
            if telemetry is not None:
                telemetry.shutdown(2.0)
            tracing.shutdown()
            assert not thread.thread.is_alive()
            assert not worker_thread.is_alive()

        stops.append(stop)
        return InProcess(listener.getsockname()[1], exported, telemetry, tracing)

    yield start
    for stop in stops:
        stop()


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def test_one_message_is_one_trace_across_transport_worker_transport(in_process: Callable[..., InProcess]) -> None:
    harness = in_process()
    response = harness.exchange(sip_request("OPTIONS", call_id="trace-me@test"))
    assert response.startswith(b"SIP/2.0 200 ")
    spans = wait_for(
        lambda: harness.spans() if len(harness.spans()) >= 3 else None, what="receive, route and write spans"
    )
    [receive] = by_name(spans, "sip.receive")
    [route] = by_name(spans, "sip.route")
    [write] = by_name(spans, "sip.write")
    assert receive.context is not None and route.context is not None and write.context is not None
    trace_id = receive.context.trace_id
    assert route.context.trace_id == write.context.trace_id == trace_id
    assert receive.parent is None
    assert route.parent is not None and route.parent.span_id == receive.context.span_id
    assert write.parent is not None and write.parent.span_id == route.context.span_id
    assert receive.resource.attributes["service.name"] == "sipwire-transport"
    assert route.resource.attributes["service.name"] == "sipwire-worker"
    assert (receive.kind, route.kind, write.kind) == (SpanKind.SERVER, SpanKind.INTERNAL, SpanKind.PRODUCER)
    # Times: the receive ends before the route starts, the write starts after it (one clock, one process).
    assert receive.start_time is not None and receive.end_time is not None and route.start_time is not None
    assert receive.start_time <= receive.end_time <= route.start_time
    assert write.start_time is not None and route.end_time is not None and write.end_time is not None
    assert write.start_time <= write.end_time
    assert receive.attributes is not None and route.attributes is not None and write.attributes is not None
    assert receive.attributes["network.transport"] == "tcp"
    assert receive.attributes["network.peer.address"] == "127.0.0.1"
    assert receive.attributes["server.port"] == harness.port
    assert route.attributes["sip.method"] == "OPTIONS"
    assert route.attributes["sip.call_id"] == "trace-me@test"
    assert route.attributes["sip.status_code"] == 200
    assert write.attributes["network.peer.port"] == receive.attributes["network.peer.port"]
    assert "error.type" not in write.attributes
    assert write.status.status_code is StatusCode.UNSET


def test_a_failed_write_job_span_carries_its_outcome(in_process: Callable[..., InProcess]) -> None:
    from tests.routers_for_tests import send_and_report

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    harness = in_process(send_and_report)
    response = harness.exchange(sip_request("OPTIONS", headers=[("X-Target-Port", str(closed_port))]))
    assert response.startswith(b"SIP/2.0 200 refused")
    spans = wait_for(
        lambda: (
            spans
            if len(by_name(spans := harness.spans(), "sip.write")) >= 2
            and by_name(spans, "sip.route")
            and by_name(spans, "tcp.connect")
            else None
        ),
        what="both write spans, the route span and the connect span",
    )
    [route] = by_name(spans, "sip.route")
    assert route.context is not None
    writes = {span.attributes["network.peer.port"]: span for span in by_name(spans, "sip.write") if span.attributes}
    failed = writes[closed_port]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None and failed.attributes["error.type"] == "refused"
    assert failed.status.description is not None and "refused" in failed.status.description.lower()
    assert failed.parent is not None and failed.parent.span_id == route.context.span_id
    assert failed.context is not None
    # The connect the job opened is the write span's child, and failed the same way.
    [connect] = by_name(spans, "tcp.connect")
    assert connect.parent is not None and connect.parent.span_id == failed.context.span_id
    assert connect.attributes is not None and connect.attributes["error.type"] == "refused"
    assert connect.kind is SpanKind.CLIENT
    # The answer, written from the outcome callback, is still in the message's trace.
    [answer] = [span for port, span in writes.items() if port != closed_port]
    assert answer.context is not None and answer.context.trace_id == route.context.trace_id
    assert answer.parent is not None and answer.parent.span_id == route.context.span_id
    assert answer.status.status_code is StatusCode.UNSET


def test_a_routers_own_spans_nest_under_sip_route(in_process: Callable[..., InProcess]) -> None:
    tracers: list[Any] = []

    def traced_router(message: SipMessage, ctx: RouteContext) -> None:
        with tracers[0].start_as_current_span("registrar.lookup") as span:
            span.set_attribute("db.system", "sqlite")
        responder.route(message, ctx)

    harness = in_process(traced_router)
    tracers.append(harness.tracing.provider.get_tracer("router"))
    assert harness.exchange(sip_request("OPTIONS")).startswith(b"SIP/2.0 200 ")
    spans = wait_for(
        lambda: harness.spans() if len(by_name(harness.spans(), "registrar.lookup")) == 1 else None,
        what="the router's span",
    )
    [route] = by_name(spans, "sip.route")
    [lookup] = by_name(spans, "registrar.lookup")
    assert route.context is not None and lookup.context is not None
    assert lookup.context.trace_id == route.context.trace_id
    assert lookup.parent is not None and lookup.parent.span_id == route.context.span_id
    assert lookup.resource.attributes["service.name"] == "sipwire-worker"


@pytest.mark.parametrize("ratio", [None, 0.0], ids=["telemetry-off", "sampler-always-off"])
def test_no_sampling_gives_an_empty_trace_context_and_no_spans(
    in_process: Callable[..., InProcess], ratio: float | None
) -> None:
    harness = in_process(echo_trace_context, ratio)
    for cseq in range(1, 4):
        response = harness.exchange(sip_request("OPTIONS", cseq))
        assert b"\r\nX-Trace: -\r\n" in response
    if harness.telemetry is not None:
        harness.telemetry.drain()
    assert harness.spans() == []
    assert not harness.tracing.recorder.queue


def test_sampled_message_carries_its_receive_span_as_context(in_process: Callable[..., InProcess]) -> None:
    harness = in_process(echo_trace_context, 1.0)
    response = harness.exchange(sip_request("OPTIONS"))
    header = next(line for line in response.split(b"\r\n") if line.startswith(b"X-Trace: "))
    parsed = parse_traceparent(header[9:].decode())
    assert parsed is not None
    [receive] = wait_for(lambda: by_name(harness.spans(), "sip.receive"), what="the receive span")
    assert receive.context is not None
    assert parsed == (receive.context.trace_id, receive.context.span_id)


# -- end to end: a transport process exporting over OTLP/HTTP ------------------------------------------------


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int


class OtlpReceiver:
    """A minimal OTLP/HTTP traces endpoint on loopback that keeps what it is sent."""

    def __init__(self, keep: bool = True) -> None:
        self.spans: list[ReceivedSpan] = []
        self.metrics: dict[str, tuple[str, str, float]] = {}  # name -> (service, unit, last sum of its points)
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if keep and self.path == "/v1/traces":
                    receiver.keep(ExportTraceServiceRequest.FromString(body))
                elif keep and self.path == "/v1/metrics":
                    receiver.keep_metrics(ExportMetricsServiceRequest.FromString(body))
                with receiver.lock:
                    receiver.requests += 1
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def keep(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            str(resource.get("service.name")),
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.kind,
                            {kv.key: _value(kv.value) for kv in span.attributes},
                            span.status.code,
                        )
                    )
        with self.lock:
            self.spans.extend(received)

    def keep_metrics(self, request: ExportMetricsServiceRequest) -> None:
        for resource_metrics in request.resource_metrics:
            resource = {kv.key: _value(kv.value) for kv in resource_metrics.resource.attributes}
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    points = getattr(metric, kind).data_points if kind else []
                    total = 0.0
                    for point in points:
                        if kind == "histogram":
                            total += point.count
                        else:
                            total += point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
                    with self.lock:
                        self.metrics[metric.name] = (str(resource.get("service.name")), metric.unit, total)

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def otel_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **extra,
    }


def test_transport_and_worker_export_one_linked_trace_over_otlp_http(
    start_transport: StartTransport, otlp_receiver: OtlpReceiver
) -> None:
    running = start_transport(workers=1, threads=1, env=otel_env(otlp_receiver))
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", call_id="e2e@test"))
        assert client.read_response().status == 200
        client_port = client.local_port

    def complete_trace() -> list[ReceivedSpan] | None:
        spans = otlp_receiver.snapshot()
        receives = [s for s in spans if s.name == "sip.receive"]
        if not receives:
            return None
        trace = [s for s in spans if s.trace_id == receives[0].trace_id]
        return trace if {s.name for s in trace} >= {"sip.receive", "sip.route", "sip.write"} else None

    trace = wait_for(complete_trace, timeout=10.0, what="the receive, route and write spans at the receiver")
    [receive] = [s for s in trace if s.name == "sip.receive"]
    [route] = [s for s in trace if s.name == "sip.route"]
    [write] = [s for s in trace if s.name == "sip.write"]
    services = (receive.service, route.service, write.service)
    assert services == ("sipwire-transport", "sipwire-worker", "sipwire-transport")
    assert receive.parent_id == ""
    assert route.parent_id == receive.span_id
    assert write.parent_id == route.span_id
    assert receive.attributes["network.peer.port"] == client_port
    assert receive.attributes["server.port"] == running.port
    assert route.attributes["sip.method"] == "OPTIONS"
    assert route.attributes["sip.call_id"] == "e2e@test"
    assert route.attributes["sip.status_code"] == 200
    assert write.attributes["network.peer.port"] == client_port
    assert "error.type" not in write.attributes
    assert len(receive.trace_id) == 32 and receive.trace_id == format_trace_id(int(receive.trace_id, 16))
    assert receive.span_id == format_span_id(int(receive.span_id, 16))
    telemetry = running.control("stats")["telemetry"]
    assert telemetry["spans"] >= 2
    assert telemetry["dropped_queue_full"] == 0


def test_tls_handshake_span_over_otlp_http(start_transport: StartTransport, otlp_receiver: OtlpReceiver) -> None:
    running = start_transport(workers=1, threads=1, env=otel_env(otlp_receiver))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    raw = socket.create_connection((running.host, running.tls_port), timeout=5.0)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        client = SipClient(tls)
        client.send(sip_request("OPTIONS", call_id="tls-e2e@test"))
        assert client.read_response().status == 200
        client_port = tls.getsockname()[1]
    spans = wait_for(
        lambda: (
            otlp_receiver.snapshot()
            if {"tls.handshake", "sip.receive"} <= {s.name for s in otlp_receiver.snapshot()}
            else None
        ),
        timeout=10.0,
        what="the handshake and receive spans",
    )
    [handshake] = [s for s in spans if s.name == "tls.handshake"]
    [receive] = [s for s in spans if s.name == "sip.receive"]
    assert handshake.attributes["tls.protocol.version"] == "1.3"
    assert handshake.attributes["tls.cipher"].startswith("TLS_")
    assert handshake.attributes["tls.established"] is True
    assert handshake.attributes["network.peer.port"] == client_port
    assert handshake.attributes["server.port"] == running.tls_port
    assert receive.attributes["tls.protocol.version"] == "1.3"
    assert receive.attributes["sip.transport"] == "tls"


def test_websocket_upgrade_spans_over_otlp_http(start_transport: StartTransport, otlp_receiver: OtlpReceiver) -> None:
    """A ``ws.upgrade`` span per upgrade: a root for WS, the TLS handshake's child for WSS; a refusal is an error."""
    running = start_transport(workers=1, threads=1, ws="127.0.0.1:0", wss="127.0.0.1:0", env=otel_env(otlp_receiver))
    for secure in (False, True):
        with ws_connect(running, secure) as ws:
            ws.send(sip_over_ws(sip_request("OPTIONS", call_id=f"ws-span-{secure}@test")).decode())
            assert parse_response(ws.recv(timeout=5)).status == 200
    refused = RawWs(running, secure=False)
    assert refused.upgrade(subprotocol="").startswith(b"HTTP/1.1 400")  # no "sip" subprotocol
    refused.sock.close()

    def upgrades() -> list[ReceivedSpan] | None:
        spans = [s for s in otlp_receiver.snapshot() if s.name == "ws.upgrade"]
        return spans if len(spans) == 3 else None

    spans = wait_for(upgrades, timeout=10.0, what="three ws.upgrade spans")
    by_transport = {(s.attributes["sip.transport"], s.status_code): s for s in spans}
    ws_ok, wss_ok = by_transport[("ws", StatusCode.UNSET.value)], by_transport[("wss", StatusCode.UNSET.value)]
    refused_span = by_transport[("ws", StatusCode.ERROR.value)]
    assert ws_ok.kind == SpanKind.SERVER.value + 1 and not ws_ok.parent_id  # OTLP kinds count from 1
    assert ws_ok.attributes["server.port"] == running.ws_port and "tls.protocol.name" not in ws_ok.attributes
    [handshake] = [s for s in otlp_receiver.snapshot() if s.name == "tls.handshake"]
    assert (wss_ok.trace_id, wss_ok.parent_id) == (handshake.trace_id, handshake.span_id)
    assert wss_ok.attributes["server.port"] == running.wss_port
    assert wss_ok.attributes["tls.protocol.version"] in ("1.2", "1.3")
    assert refused_span.attributes["error.type"] == "no_sip_subprotocol"


def test_a_dead_collector_is_logged_once_and_traffic_goes_on(start_transport: StartTransport) -> None:
    with socket.socket() as probe:  # nobody listens here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "0.5",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    running = start_transport(workers=1, threads=1, env=env)
    with SipClient.connect(running) as client:
        for round_ in range(3):
            for cseq in range(1, 11):
                started = time.monotonic()
                client.send(sip_request("OPTIONS", cseq, call_id=f"dead-{round_}@test"))
                assert client.read_response().status == 200
                assert time.monotonic() - started < 1.0
            time.sleep(0.4)  # let batches fail in between
    wait_for(lambda: "exporting spans to" in running.log_text(), timeout=10.0, what="the warning")
    time.sleep(1.0)
    log_text = running.log_text()
    # One warning from the instance's one exporter for the whole outage; none of the SDK's per-retry lines.
    assert log_text.count("exporting spans to") == 1, log_text
    assert "failed (Failed to export spans batch" in log_text  # the SDK's reason is in the one warning
    export_lines = [line for line in log_text.splitlines() if "export" in line.lower()]
    assert all("telemetry:" in line for line in export_lines), export_lines
    # The failed spans are counted where the transport reports (ctl stats, the stats block, /metrics).
    counters = wait_for(
        lambda: (c := running.control("stats")["counters"]).get("telemetry.exporter_spans_failed", 0) > 0 and c,
        what="the exporter's failure count in the transport's counters",
    )
    assert counters["telemetry.exporter_spans_exported"] == 0


def test_metrics_are_exported_over_otlp_http(start_transport: StartTransport, otlp_receiver: OtlpReceiver) -> None:
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_TRACES_EXPORTER": "none",  # the shared endpoint alone would turn traces on too
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    }
    running = start_transport(workers=1, threads=1, env=env)
    with SipClient.connect(running) as client:
        for cseq in range(1, 4):
            client.send(sip_request("OPTIONS", cseq))
            assert client.read_response().status == 200

    def received() -> dict[str, tuple[str, str, float]] | None:
        with otlp_receiver.lock:
            metrics = dict(otlp_receiver.metrics)
        done = metrics.get("sipwire.messages.received", ("", "", 0.0))[2] >= 3
        return metrics if done and metrics.get("sipwire.write_jobs", ("", "", 0.0))[2] >= 3 else None

    metrics = wait_for(received, timeout=10.0, what="the message and write-job counters at the receiver")
    assert metrics["sipwire.messages.received"][:2] == ("sipwire-transport", "{message}")
    assert metrics["sipwire.write_jobs"][1] == "{job}"
    assert metrics["sipwire.connections.opened"][2] >= 1
    assert otlp_receiver.snapshot() == []  # traces stay off: only metrics were asked for


@pytest.fixture
def otlp_grpc_receiver() -> Iterator[tuple[OtlpReceiver, str]]:
    """The same keeper behind an OTLP/gRPC TraceService on loopback."""
    from concurrent import futures

    import grpc  # type: ignore[import-untyped]
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    keeper = OtlpReceiver(keep=False)  # its HTTP side stays unused

    class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:  # noqa: N802 (gRPC method name)
            keeper.keep(request)
            return ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield keeper, f"http://127.0.0.1:{port}"
    server.stop(grace=None).wait(5.0)
    keeper.close()


def test_otlp_grpc_export_carries_the_same_trace(
    start_transport: StartTransport, otlp_grpc_receiver: tuple[OtlpReceiver, str]
) -> None:
    keeper, endpoint = otlp_grpc_receiver
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    running = start_transport(workers=1, threads=1, env=env)
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", call_id="grpc@test"))
        assert client.read_response().status == 200
    spans = wait_for(
        lambda: (
            keeper.snapshot()
            if {"sip.receive", "sip.route", "sip.write"} <= {s.name for s in keeper.snapshot()}
            else None
        ),
        timeout=10.0,
        what="the three spans over gRPC",
    )
    [receive] = [s for s in spans if s.name == "sip.receive"]
    [route] = [s for s in spans if s.name == "sip.route"]
    [write] = [s for s in spans if s.name == "sip.write"]
    assert route.parent_id == receive.span_id and write.parent_id == route.span_id
    assert route.service == "sipwire-worker" and receive.service == write.service == "sipwire-transport"


def test_tracing_off_loads_no_sdk_in_the_worker_or_the_transport_modules() -> None:
    """Off is free: with no OTEL_* set, importing the transport and worker loads no OpenTelemetry SDK module."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env["PYTHONPATH"] = str(REPO)
    code = (
        "import sys, transport.server, transport.worker; "
        "from sipwire.otel.setup import transport_telemetry, worker_tracing; "
        "assert transport_telemetry('x') is None and worker_tracing() is None; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_wss_connections_carry_the_tls_attributes() -> None:
    from sipwire.otel.attributes import connection_attributes

    wss = connection_attributes("wss", ("127.0.0.1", 8089), ("127.0.0.1", 40000), False, ("TLSv1.3", "AES"))
    assert (wss["sip.transport"], wss["network.transport"], wss["tls.protocol.version"]) == ("wss", "tcp", "1.3")
    ws = connection_attributes("ws", ("127.0.0.1", 8088), ("127.0.0.1", 40001), False, None)
    assert ws["sip.transport"] == "ws" and "tls.protocol.name" not in ws
