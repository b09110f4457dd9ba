"""The console's REST API, /metrics and OTLP receiver, against a real console and a real transport.

Both run as child processes (``sipwire transport`` and ``sipwire console``)
on loopback; requests go through httpx over real sockets.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, SipClient, run_ctl, sip_request, wait_for
from tests.console_process import RunningConsole, console_starter

MAX_THREADS = 8
MAX_THREADS_ENV = {"SIPWIRE_MAX_THREADS": str(MAX_THREADS)}


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[Callable[..., RunningConsole]]:
    yield from console_starter(tmp_path)


def _options(client: SipClient, cseq: int) -> None:
    client.send(sip_request("OPTIONS", cseq, call_id=f"console-{client.local_port}"))
    assert client.read_response().status == 200


def test_health_reports_the_transport_and_openapi_is_served(start_transport, start_console) -> None:
    transport = start_transport()
    console = start_console(transport)
    with console.client() as http:
        health = http.get("/api/health").json()
        assert health["status"] == "up"
        assert health["pid"] == transport.process.pid
        assert health["listening"]["tcp"] == f"127.0.0.1:{transport.port}"
        assert health["uptime"] >= 0
        assert http.get("/docs").status_code == 200
        schema = http.get("/openapi.json").json()
        assert {"get", "put"} <= set(schema["paths"]["/api/threads"])
        assert "delete" in schema["paths"]["/api/connections/{conn_id}"]
        assert "ThreadsResize" in json.dumps(schema["paths"]["/api/threads"]["put"])


def test_changes_need_the_admin_token(start_transport, start_console) -> None:
    transport = start_transport(env=MAX_THREADS_ENV)
    console = start_console(transport)
    with console.client() as http:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Basic {console.token}"}):
            answer = http.put("/api/threads", json={"size": 3}, headers=headers)
            assert answer.status_code == 401, answer.text
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert http.delete("/api/connections/1", headers=headers).status_code == 401
    assert transport.control("threads")["size"] == 2, "a refused request must not resize"
    assert console.token not in console.log_text()


@pytest.mark.parametrize(
    "body", [{"size": 0}, {"size": -1}, {"size": "x"}, {"size": MAX_THREADS + 1}, {"size": 2.5}, {}]
)
def test_bad_sizes_are_422_with_a_reason(start_transport, start_console, body: dict[str, Any]) -> None:
    transport = start_transport(env=MAX_THREADS_ENV)
    console = start_console(transport)
    with console.client(authorized=True) as http:
        answer = http.put("/api/threads", json=body)
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert detail[0]["loc"][:2] == ["body", "size"]
        assert detail[0]["msg"]
        if body.get("size") == MAX_THREADS + 1:
            assert f"{MAX_THREADS} (max_threads)" in detail[0]["msg"]
        assert (
            http.put("/api/threads", content=b"{not json", headers={"content-type": "application/json"}).status_code
            == 422
        )
    assert transport.control("threads")["size"] == 2


def test_resize_answers_the_new_state_and_is_reflected_everywhere(start_transport, start_console) -> None:
    transport = start_transport(env=MAX_THREADS_ENV)
    console = start_console(transport)
    with console.client(authorized=True) as http:
        answer = http.put("/api/threads", json={"size": 4})
        assert answer.status_code == 200, answer.text
        assert answer.json()["size"] == 4
        assert [t["index"] for t in answer.json()["threads"]] == [0, 1, 2, 3]
        state = http.get("/api/threads").json()
        assert state["size"] == 4 and state["max"] == MAX_THREADS
        assert transport.control("threads")["size"] == 4
        ctl = run_ctl(transport, "threads", "--json")
        assert json.loads(ctl.stdout)["size"] == 4
        assert http.put("/api/threads", json={"size": 1}).json()["size"] == 1
        assert len(http.get("/api/stats").json()["threads"]) == 1


def test_connections_list_detail_and_delete_really_closes(start_transport, start_console) -> None:
    transport = start_transport()
    console = start_console(transport)
    clients = [SipClient.connect(transport) for _ in range(3)]
    try:
        for cseq, client in enumerate(clients, 1):
            _options(client, cseq)
        ports = {f"127.0.0.1:{c.local_port}" for c in clients}
        with console.client(authorized=True) as http:
            # Reads come from the stats block, which the transport updates a few times a second.
            listed = wait_for(
                lambda: (
                    (r := http.get("/api/connections", params={"proto": "tcp", "state": "open"}).json())["total"] == 3
                    and all(c["messages_in"] == 1 for c in r["connections"])
                    and r
                ),
                what="three open TCP connections with one message each",
            )
            assert {c["remote"] for c in listed["connections"]} == ports
            assert all(c["messages_in"] == 1 and c["transport"] == "tcp" for c in listed["connections"])
            one = http.get("/api/connections", params={"limit": 1}).json()
            assert one["total"] == 3 and len(one["connections"]) == 1
            assert http.get("/api/connections", params={"proto": "tls"}).json()["total"] == 0
            by_age = http.get("/api/connections", params={"sort": "age", "order": "desc"}).json()["connections"]
            assert [c["age"] for c in by_age] == sorted((c["age"] for c in by_age), reverse=True)
            assert http.get("/api/connections", params={"limit": 0}).status_code == 422
            assert http.get("/api/connections", params={"proto": "udp"}).status_code == 422

            victim = next(c for c in listed["connections"] if c["remote"] == f"127.0.0.1:{clients[0].local_port}")
            detail = http.get(f"/api/connections/{victim['id']}").json()
            assert detail["remote"] == victim["remote"] and detail["bytes_in"] > 0
            closed = http.delete(f"/api/connections/{victim['id']}")
            assert closed.status_code == 200 and closed.json() == {"closed": victim["id"]}
            clients[0].read_until_closed()
            assert http.get(f"/api/connections/{victim['id']}").status_code == 404
            assert http.delete(f"/api/connections/{victim['id']}").status_code == 404
            wait_for(lambda: http.get("/api/connections").json()["total"] == 2, what="the closed one to leave the list")
        assert transport.counters()["closed_by_operator"] == 1
        _options(clients[1], 9)  # the others are untouched
    finally:
        for client in clients:
            client.close()


def test_stats_and_metrics_parse_with_prometheus_client(start_transport, start_console) -> None:
    transport = start_transport()
    console = start_console(transport)
    with SipClient.connect(transport) as client:
        _options(client, 1)
        _options(client, 2)
        with console.client() as http:
            stats = wait_for(
                lambda: (
                    (r := http.get("/api/stats").json())["connections"] == 1
                    and r["counters"].get("messages_in", 0) >= 2
                    and r["routing_ms"]["count"] >= 2  # the worker's stage histograms arrive a moment later
                    and r
                ),
                what="stats showing the connection, its two messages and their stages",
            )
            assert stats["tls_handshake_ms"]["buckets"][-1]["le"] == "+Inf"
            answer = http.get("/metrics")
            assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
            families = {family.name: family for family in text_string_to_metric_families(answer.text)}

    def value(name: str, suffix: str = "", **labels: str) -> float:
        """The sample ``name`` (+ ``_total``) or ``name + suffix`` (``_count``, ``_sum`` of a histogram)."""
        wanted = (name + suffix,) if suffix else (name, f"{name}_total")
        for sample in families[name].samples:
            if sample.name in wanted and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        raise AssertionError(f"no sample {name}{suffix} {labels} in /metrics")

    assert value("sipwire_transport_up") == 1
    assert value("sipwire_connections") == 1
    assert value("sipwire_max_connections") == 2048
    assert value("sipwire_events", event="messages_in") >= 2  # the family drops the counter's _total
    assert families["sipwire_events"].type == "counter"
    assert families["sipwire_tls_handshake_seconds"].type == "histogram"
    for stage in ("read_framed", "queue_wait", "routing", "write"):
        assert value("sipwire_message_stage_seconds", "_count", stage=stage) >= 2
        assert value("sipwire_message_stage_seconds", "_sum", stage=stage) > 0
    assert value("sipwire_dispatch_seconds", "_count") >= 2
    assert value("sipwire_io_thread_load_ratio", thread="0") >= 0
    assert value("sipwire_worker_up", worker="0") == 1


def _launch_transport(state_dir: Path, instance: str, log_path: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "sipwire.cli", "transport", "--tcp", "127.0.0.1:0", "--tls", "", "--workers", "1",
        "--instance", instance, "--state-dir", str(state_dir),
    ]  # fmt: skip
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_console_serves_while_the_transport_is_down_and_recovers_by_itself(tmp_path: Path, start_console) -> None:
    state_dir = tmp_path / "state"
    console = start_console(instance="comeback", state_dir=state_dir)
    with console.client() as http:
        down = http.get("/api/health").json()
        assert down["status"] == "down" and down["down_for"] >= 0 and "cannot reach" in down["error"]
        assert http.get("/api/stats").status_code == 503
        assert "transport down" in http.get("/").text
        assert http.get("/metrics").text.count("sipwire_transport_up 0") == 1
        first_pid = 0
        for round_ in range(2):
            process = _launch_transport(state_dir, "comeback", tmp_path / "transport.log")
            try:
                up = wait_for(
                    lambda: (h := http.get("/api/health").json())["status"] == "up" and h,
                    timeout=20,
                    what="the console to see the transport up",
                )
                assert up["pid"] == process.pid != first_pid
                first_pid = up["pid"]
                wait_for(lambda: "transport up" in http.get("/", headers={}).text, what="overview to show it up")
                assert http.get("/api/stats").status_code == 200
            finally:
                _stop(process)
            later = wait_for(lambda: (h := http.get("/api/health").json())["status"] == "down" and h, what="down again")
            assert later["pid"] == first_pid, f"round {round_}: down keeps the last pid seen"
            time.sleep(1.1)
            assert http.get("/api/health").json()["down_for"] >= 1.0
        assert console.process.poll() is None


def _protobuf_export(trace_id: bytes) -> bytes:
    root = Span(
        trace_id=trace_id, span_id=b"\x01" * 8, name="sip.receive", kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=1_700_000_000_000_000_000, end_time_unix_nano=1_700_000_000_003_000_000,
        attributes=[KeyValue(key="network.transport", value=AnyValue(string_value="tcp"))],
    )  # fmt: skip
    child = Span(
        trace_id=trace_id, span_id=b"\x02" * 8, parent_span_id=b"\x01" * 8, name="sip.route",
        start_time_unix_nano=1_700_000_000_001_000_000, end_time_unix_nano=1_700_000_000_002_000_000,
    )  # fmt: skip
    resource = ResourceSpans(scope_spans=[ScopeSpans(spans=[root, child])])
    resource.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="sipwire-transport")))
    return ExportTraceServiceRequest(resource_spans=[resource]).SerializeToString()


def test_otlp_receiver_takes_protobuf_and_json_and_refuses_garbage(tmp_path: Path, start_console) -> None:
    console = start_console(instance="traces", state_dir=tmp_path / "state")
    trace_id = bytes(range(1, 17))
    with console.client() as http:
        answer = http.post(
            "/v1/traces", content=_protobuf_export(trace_id), headers={"content-type": "application/x-protobuf"}
        )
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-protobuf"
        ExportTraceServiceResponse.FromString(answer.content)
        json_export = {
            "resourceSpans": [
                {
                    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "sipwire-worker"}}]},
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "traceId": trace_id.hex(),
                                    "spanId": "0303030303030303",
                                    "parentSpanId": "0202020202020202",
                                    "name": "sip.write",
                                    "kind": "SPAN_KIND_CLIENT",
                                    "startTimeUnixNano": "1700000000001500000",
                                    "endTimeUnixNano": "1700000000001800000",
                                    "status": {"code": 2, "message": "reset"},
                                }
                            ]
                        }
                    ],
                }
            ]
        }
        gzipped = gzip.compress(json.dumps(json_export).encode())
        answer = http.post(
            "/v1/traces", content=gzipped, headers={"content-type": "application/json", "content-encoding": "gzip"}
        )
        assert answer.status_code == 200, answer.text
        page = http.get(f"/traces/{trace_id.hex()}").text
        assert all(name in page for name in ("sip.receive", "sip.route", "sip.write", "sipwire-worker", "reset"))
        assert trace_id.hex() in http.get("/traces").text
        assert http.get(f"/traces/{'ab' * 16}").status_code == 404
        bad = {"content-type": "application/x-protobuf"}
        assert http.post("/v1/traces", content=b"\xff\xff\xff", headers=bad).status_code == 400
        assert http.post("/v1/traces", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
        assert http.post("/v1/traces", content=b"[1]", headers={"content-type": "application/json"}).status_code == 400
        huge = b"\x00" * (4 * 1024 * 1024 + 1)
        assert http.post("/v1/traces", content=huge, headers=bad).status_code == 413
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        assert families["sipwire_console_spans_received"].samples[0].value == 3


def test_trace_store_is_bounded_in_spans_and_shows_what_it_evicted(tmp_path: Path, start_console) -> None:
    env = {"SIPWIRE_CONSOLE_TRACE_SPANS": "100", "SIPWIRE_CONSOLE_TRACE_RETENTION": "0"}
    console = start_console(instance="ring", state_dir=tmp_path / "state", env=env)
    with console.client() as http:
        for number in range(1, 56):  # two spans each: 110 spans for room for 100
            trace_id = number.to_bytes(16, "big")
            answer = http.post(
                "/v1/traces", content=_protobuf_export(trace_id), headers={"content-type": "application/x-protobuf"}
            )
            assert answer.status_code == 200
        page = http.get("/traces").text
        assert "50 traces held,\n  100 of 100 spans" in page
        assert "fast 5 traces (10 spans)" in page
        listed = http.get("/api/traces").json()
        assert (listed["held"], listed["spans"], listed["capacity"]) == (50, 100, 100)
        assert listed["evicted"] == {"fast": 5, "slow": 0, "error": 0, "pinned": 0}
        assert listed["traces"][0]["state"] == "assembling"
        assert (1).to_bytes(16, "big").hex() not in page
        assert (55).to_bytes(16, "big").hex() in page
        families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
        evicted = {s.labels["reason"]: s.value for s in families["sipwire_console_traces_evicted"].samples}
        assert evicted == {"fast": 5, "slow": 0, "error": 0, "pinned": 0}
        assert families["sipwire_console_spans"].samples[0].value == 100


def test_generated_token_is_written_0600_and_never_logged(start_transport, start_console) -> None:
    transport = start_transport(env=MAX_THREADS_ENV)
    console = start_console(transport, token=None)
    mode = stat.S_IMODE(console.token_path.stat().st_mode)
    assert mode == 0o600, oct(mode)
    log = console.log_text()
    assert str(console.token_path) in log
    assert console.token not in log
    with console.client(authorized=True) as http:
        assert http.put("/api/threads", json={"size": 3}).json()["size"] == 3
        for page in ("/", "/threads", "/connections", "/login", "/traces"):
            assert console.token not in http.get(page).text


def test_htmx_gets_the_page_block_and_everyone_else_json(start_transport, start_console) -> None:
    transport = start_transport()
    console = start_console(transport)
    with console.client() as http:
        assert http.get("/api/stats").headers["content-type"] == "application/json"
        fragment = http.get("/api/stats", headers={"HX-Request": "true"})
        assert fragment.headers["content-type"].startswith("text/html")
        assert "<html" not in fragment.text and 'data-testid="connections"' in fragment.text
        page = http.get("/").text
        assert page.startswith("<!doctype html>") and 'hx-get="/api/stats"' in page
        assert '<script src="/assets/htmx/htmx.min.js">' in page
        htmx = http.get("/assets/htmx/htmx.min.js")
        assert htmx.status_code == 200
        assert (REPO / "node_modules" / "htmx.org" / "dist" / "htmx.min.js").read_bytes() == htmx.content
        table = http.get("/api/connections", headers={"HX-Request": "true"}).text
        assert "conn-total" in table and "<html" not in table


def test_login_sets_a_strict_httponly_cookie_and_forms_need_the_csrf_token(start_transport, start_console) -> None:
    transport = start_transport(env=MAX_THREADS_ENV)
    console = start_console(transport)
    with console.client(follow_redirects=False) as http:
        refused = http.post("/login", data={"token": "wrong", "next": "/threads"})
        assert refused.status_code == 401 and "sipwire_session" not in refused.headers.get("set-cookie", "")
        login = http.post("/login", data={"token": console.token, "next": "https://elsewhere.example/"})
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert console.token not in cookie
        page = http.get("/threads").text
        assert "resize-form" in page
        csrf = page.split('"X-CSRF-Token": "', 1)[1].split('"', 1)[0]
        htmx = {"HX-Request": "true"}
        assert http.put("/api/threads", data={"size": "3"}, headers=htmx).status_code == 401  # no CSRF token
        foreign = {**htmx, "X-CSRF-Token": csrf, "Origin": "http://evil.example"}
        assert http.put("/api/threads", data={"size": "3"}, headers=foreign).status_code == 401
        assert transport.control("threads")["size"] == 2
        done = http.put("/api/threads", data={"size": "3"}, headers={**htmx, "X-CSRF-Token": csrf})
        assert done.status_code == 200 and "resized to 3" in done.text
        assert transport.control("threads")["size"] == 3
        invalid = http.put("/api/threads", data={"size": "0"}, headers={**htmx, "X-CSRF-Token": csrf})
        assert invalid.status_code == 422 and "Invalid size" in invalid.text
        http.post("/logout", data={"csrf": csrf})
        assert http.put("/api/threads", data={"size": "2"}, headers={**htmx, "X-CSRF-Token": csrf}).status_code == 401


def test_an_options_request_traced_by_transport_and_worker_arrives_as_one_trace(
    tmp_path: Path, start_transport, start_console
) -> None:
    console = start_console(instance="receiver-only", state_dir=tmp_path / "state")
    telemetry = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{console.url}/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    transport = start_transport(env=telemetry, workers=1)
    with SipClient.connect(transport) as client:
        _options(client, 1)
    with console.client() as http:

        def full_trace() -> dict[str, Any] | None:
            for summary in http.get("/api/traces").json()["traces"]:
                trace = http.get(f"/api/traces/{summary['trace_id']}").json()
                if {"sip.receive", "sip.route"} <= {span["name"] for span in trace["spans"]}:
                    return dict(trace)
            return None

        trace = wait_for(full_trace, timeout=15, what="a trace with sip.receive and sip.route")
        by_name = {span["name"]: span for span in trace["spans"]}
        assert by_name["sip.route"]["parent_id"] == by_name["sip.receive"]["span_id"]
        page = http.get(f"/traces/{trace['trace_id']}").text
        assert "sip.receive" in page and "sip.route" in page


def test_a_resize_with_a_number_json_cannot_write_back_is_a_422_not_a_500(start_transport, start_console) -> None:
    """``{"size": 1e309}`` (or NaN, Infinity) parsed to a float the 422's echo of the input could not render: 500."""
    console = start_console(start_transport())
    with console.client(authorized=True) as http:
        for body in (b'{"size": 1e309}', b'{"size": NaN}', b'{"size": -Infinity}', b"[Infinity]"):
            answer = http.put("/api/threads", content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == 422, (body, answer.status_code, answer.text)
            assert answer.json()["detail"][0]["type"] == "json_invalid"
    assert "Traceback" not in console.log_text()
