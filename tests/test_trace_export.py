"""One export path per instance, end to end: real transport and worker processes exporting to a real console.

The transport's ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` points at a ``sipwire
console`` started by the test; what its trace store holds is read back over
its REST API. Also here: log lines of a traced message carry its ids, in the
transport and in the worker, and only when tracing is on.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningTransport, SipClient, sip_request, wait_for
from tests.console_process import RunningConsole, console_starter

StartTransport = Callable[..., RunningTransport]
StartConsole = Callable[..., RunningConsole]
EXPORTER = "sipwire.otel.exporter"
LOG_IDS = re.compile(r" trace_id=([0-9a-f]{32}) span_id=([0-9a-f]{16})$")


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[StartConsole]:
    yield from console_starter(tmp_path)


def tracing_to(console: RunningConsole, **extra: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{console.url}/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **extra,
    }


def exporter_processes() -> dict[int, int]:
    """pid -> parent pid of every ``python -m sipwire.otel.exporter`` on this machine."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        if EXPORTER.encode() in command:
            found[int(entry)] = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return found


def traces_at(console: RunningConsole) -> list[dict[str, Any]]:
    """Every trace the console lists, with its spans."""
    with console.client() as http:
        return [http.get(f"/api/traces/{t['trace_id']}").json() for t in http.get("/api/traces").json()["traces"]]


def names(trace: dict[str, Any]) -> set[str]:
    return {span["name"] for span in trace["spans"]}


def test_a_routed_messages_trace_arrives_whole_through_the_transports_one_exporter(
    start_transport: StartTransport, start_console: StartConsole, tmp_path: Path
) -> None:
    console = start_console(instance="export-sink", state_dir=tmp_path / "console-state")
    transport = start_transport(workers=2, threads=1, env=tracing_to(console))
    # One exporter process, the transport's child; the workers start none.
    owners = wait_for(
        lambda: [
            ppid for ppid in exporter_processes().values() if ppid in (transport.process.pid, *transport.worker_pids)
        ],
        what="the exporter process",
    )
    assert owners == [transport.process.pid]
    with SipClient.connect(transport) as client:
        for cseq in range(1, 11):
            client.send(sip_request("OPTIONS", cseq, call_id=f"whole-{cseq}@test"))
            assert client.read_response().status == 200

    def settled() -> list[dict[str, Any]] | None:
        traces = traces_at(console)
        return traces if len(traces) == 10 and all(t["state"] == "complete" for t in traces) else None

    traces = wait_for(settled, timeout=15.0, what="ten complete traces at the console")
    for trace in traces:
        spans = {span["name"]: span for span in trace["spans"]}
        assert set(spans) == {"sip.receive", "sip.route", "sip.write"}, trace
        assert spans["sip.route"]["parent_id"] == spans["sip.receive"]["span_id"]
        assert spans["sip.write"]["parent_id"] == spans["sip.route"]["span_id"]
        assert spans["sip.route"]["service"] == "sipwire-worker"
        assert spans["sip.receive"]["service"] == spans["sip.write"]["service"] == "sipwire-transport"
        assert trace["services"] == ["sipwire-transport", "sipwire-worker"]
    call_ids = {
        span["attributes"].get("sip.call_id") for t in traces for span in t["spans"] if span["name"] == "sip.route"
    }
    assert call_ids == {f"whole-{cseq}@test" for cseq in range(1, 11)}
    counters = wait_for(
        lambda: (c := transport.counters()).get("telemetry.exporter_spans_exported", 0) >= 30 and c,
        what="the exporter's count in the transport's counters",
    )
    assert counters["telemetry.spans"] >= 30
    dropped = {name: value for name, value in counters.items() if "dropped" in name and value}
    assert dropped == {}
    parents = list(exporter_processes().values())
    assert parents.count(transport.process.pid) == 1
    assert not set(parents) & set(transport.worker_pids)


def test_with_a_ratio_sampler_every_kept_trace_is_complete(
    start_transport: StartTransport, start_console: StartConsole, tmp_path: Path
) -> None:
    console = start_console(instance="ratio-sink", state_dir=tmp_path / "console-state")
    env = tracing_to(console, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.25")
    transport = start_transport(workers=2, threads=2, env=env)
    sent = 80
    with SipClient.connect(transport) as first, SipClient.connect(transport) as second:
        for cseq in range(1, sent + 1):
            client = first if cseq % 2 else second
            client.send(sip_request("OPTIONS", cseq, call_id=f"ratio-{cseq}@test"))
            assert client.read_response().status == 200

    def exported() -> int:
        counters = transport.counters()
        spans = counters.get("telemetry.spans", 0)
        return spans if spans and counters.get("telemetry.exporter_spans_exported") == spans else 0

    wait_for(exported, timeout=10.0, what="every recorded span exported")
    time.sleep(0.5)  # nothing more comes: all 80 exchanges were answered before
    spans = transport.counters()["telemetry.spans"]
    assert spans % 3 == 0  # whole traces only: receive, route and write of each kept message
    kept = spans // 3
    assert 4 <= kept <= 40, kept  # about a quarter of 80 (binomial: outside this, 1 in a million)

    def settled() -> list[dict[str, Any]] | None:
        traces = traces_at(console)
        return traces if len(traces) == kept and all(t["state"] != "assembling" for t in traces) else None

    traces = wait_for(settled, timeout=10.0, what="the kept traces, settled, at the console")
    assert all(t["state"] == "complete" and names(t) == {"sip.receive", "sip.route", "sip.write"} for t in traces)


def test_log_lines_of_a_traced_message_name_its_trace_in_the_transport_and_the_worker(
    start_transport: StartTransport, start_console: StartConsole, tmp_path: Path
) -> None:
    console = start_console(instance="log-sink", state_dir=tmp_path / "console-state")
    with socket.socket() as target:  # a TLS destination the transport may reach without verification
        target.bind(("127.0.0.1", 0))
        target.listen()
        port = target.getsockname()[1]
        crashing = start_transport(workers=1, router="tests.routers_for_tests:crash", env=tracing_to(console))
        sending = start_transport(
            workers=1,
            router="tests.routers_for_tests:send_and_report",
            env=tracing_to(
                console, SIPWIRE_TLS_INSECURE_DESTINATIONS=f"127.0.0.1:{port}", SIPWIRE_TLS_HANDSHAKE_TIMEOUT="1"
            ),
        )
        with SipClient.connect(crashing) as client:
            client.send(sip_request("OPTIONS", call_id="crash-logged@test"))
            assert client.read_response().status == 500
        with SipClient.connect(sending) as client:
            headers = [("X-Target-Port", str(port)), ("X-Target-Transport", "tls")]
            client.send(sip_request("OPTIONS", call_id="send-logged@test", headers=headers))
            assert client.read_response(timeout=10.0).status == 200  # the job's outcome: the handshake timed out

    def logged(running: RunningTransport, text: str) -> tuple[str, str] | None:
        for line in running.log_text().splitlines():
            match = LOG_IDS.search(line)
            if text in line and match:
                return match.group(1), match.group(2)
        return None

    worker_ids = wait_for(lambda: logged(crashing, "router raised ValueError"), what="the worker's log line")
    transport_ids = wait_for(lambda: logged(sending, "without certificate verification"), what="the transport's")

    def spans_of(trace_id: str) -> dict[str, str] | None:
        with console.client() as http:
            answer = http.get(f"/api/traces/{trace_id}")
        if answer.status_code != 200:
            return None
        return {span["span_id"]: span["name"] for span in answer.json()["spans"]}

    # Each line leads to its trace at the console, and names the span that was running.
    worker_trace = wait_for(lambda: spans_of(worker_ids[0]), what="the worker line's trace")
    assert worker_trace[worker_ids[1]] == "sip.route"
    transport_trace = wait_for(lambda: spans_of(transport_ids[0]), what="the transport line's trace")
    assert transport_trace[transport_ids[1]] == "sip.write"


def json_export(trace_id: str, error: bool = False) -> dict[str, Any]:
    """An OTLP JSON export of one two-span trace (``error``: the child failed)."""
    spans = [
        {"traceId": trace_id, "spanId": "1" * 16, "name": "sip.receive", "startTimeUnixNano": "1000",
         "endTimeUnixNano": "2000"},
        {"traceId": trace_id, "spanId": "2" * 16, "parentSpanId": "1" * 16, "name": "sip.route",
         "startTimeUnixNano": "1200", "endTimeUnixNano": "1800", "status": {"code": 2 if error else 0}},
    ]  # fmt: skip
    service = {"key": "service.name", "value": {"stringValue": "test"}}
    return {"resourceSpans": [{"resource": {"attributes": [service]}, "scopeSpans": [{"spans": spans}]}]}


def test_under_a_flood_a_listed_trace_stays_and_failed_traces_outlive_fast_ones(
    start_console: StartConsole, tmp_path: Path
) -> None:
    env = {"SIPWIRE_CONSOLE_TRACE_SPANS": "200", "SIPWIRE_CONSOLE_TRACE_RETENTION": "30"}
    console = start_console(instance="flood", state_dir=tmp_path / "console-state", env=env)
    with console.client() as http:
        failed, listed = f"{1:032x}", f"{2:032x}"
        assert http.post("/v1/traces", json=json_export(failed, error=True)).status_code == 200
        assert http.post("/v1/traces", json=json_export(listed)).status_code == 200
        assert http.get("/api/traces").json()["traces"][0]["trace_id"] == listed  # shown: pinned for 30 s
        for number in range(3, 503):  # 1,000 spans through a store of 200
            assert http.post("/v1/traces", json=json_export(f"{number:032x}")).status_code == 200
        assert http.get(f"/api/traces/{listed}").status_code == 200
        assert http.get(f"/api/traces/{failed}").json()["error"] is True  # the tail policy kept it
        assert http.get(f"/api/traces/{3:032x}").status_code == 404
        evicted = http.get("/api/traces").json()["evicted"]
    # 2 + 500 traces of 2 spans for 100 places; the listed one pinned, the failed one last in line.
    assert evicted == {"fast": 402, "slow": 0, "error": 0, "pinned": 0}


def test_no_trace_ids_in_the_log_when_tracing_is_off(start_transport: StartTransport) -> None:
    running = start_transport(workers=1, router="tests.routers_for_tests:crash")
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", call_id="crash-untraced@test"))
        assert client.read_response().status == 500
    wait_for(lambda: "router raised ValueError" in running.log_text(), what="the worker's log line")
    assert "trace_id=" not in running.log_text()
    assert running.process.pid not in exporter_processes().values()


def test_the_console_exporter_prints_whole_traces_into_the_transports_log(start_transport: StartTransport) -> None:
    running = start_transport(workers=1, env={"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"})
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", call_id="printed@test"))
        assert client.read_response().status == 200

    def printed() -> str | None:
        text = running.log_text()
        return text if '"name": "sip.write"' in text and '"name": "sip.route"' in text else None

    text = wait_for(printed, what="the spans printed by the exporter process")
    assert '"sip.call_id": "printed@test"' in text
    wait_for(lambda: running.counters().get("telemetry.exporter_spans_exported", 0) >= 3, what="the exporter's count")
