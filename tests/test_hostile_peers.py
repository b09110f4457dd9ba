"""Hostile peers against a real transport and real workers: router errors and messages that do not parse.

A router exception must cost one 500 and one counter, never a flood of
tracebacks quoting peer text; a message that frames but does not parse is
answered 400 (505 for another SIP version) or, when no answer can be
built, its connection is closed; either way it is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.conftest import RunningTransport, SipClient, sip_request, wait_for

CRASH_ROUTER = "tests.routers_for_tests:crash"
REPORT_ROUTER = "tests.routers_for_tests:send_and_report"
#: A Call-ID with a terminal escape sequence and a line separator: must never reach the log raw.
HOSTILE_CALL_ID = "crash-\x1b[2J\u2028evil"


def _response(call_id: str) -> bytes:
    return (
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-r\r\nFrom: <sip:a@h>;tag=1\r\n"
        f"To: <sip:b@h>;tag=2\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _counter(running: RunningTransport, name: str) -> int:
    return running.counters().get(name, 0)


def test_router_exception_answers_500_counts_and_logs_once_a_second_escaped(start_transport: Any) -> None:
    running = start_transport(workers=1, router=CRASH_ROUTER)
    started = time.monotonic()
    with SipClient.connect(running) as client:
        for cseq in range(1, 6):
            client.send(sip_request("OPTIONS", cseq, call_id=f"{HOSTILE_CALL_ID}-{cseq}"))
            answer = client.read_response()
            assert (answer.status, answer.reason) == (500, "Server Internal Error (router failed)")
            assert answer.all("call-id") == [f"{HOSTILE_CALL_ID}-{cseq}"]
        # Neither an ACK nor a response is ever answered: the next answer is the last OPTIONS's.
        client.send(sip_request("ACK", 6, call_id="crash-ack") + _response("crash-response"))
        client.send(sip_request("OPTIONS", 7, call_id="crash-last"))
        assert client.read_response().all("call-id") == ["crash-last"]
    elapsed = time.monotonic() - started
    wait_for(lambda: _counter(running, "router_errors") == 8, what="8 router errors counted")
    log = running.log_text()
    lines = [line for line in log.splitlines() if "router raised ValueError" in line]
    assert 1 <= len(lines) <= int(elapsed) + 1, lines  # at most one line a second
    assert "\\x1b[2J\\u2028evil" in lines[0]
    assert "\x1b" not in log and "\u2028" not in log
    assert "Traceback" not in log  # the traceback is logged at debug level only


def test_write_job_to_a_port_beyond_16_bits_is_a_bad_destination_not_a_crash(start_transport: Any) -> None:
    running = start_transport(workers=1, router=REPORT_ROUTER)
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1, call_id="port-70000", headers=[("X-Target-Port", "70000")]))
        answer = client.read_response()
        assert (answer.status, answer.reason) == (200, "bad_destination")
        assert answer.header("x-outcome-reason") == "port 70000 is out of range"
    assert _counter(running, "router_errors") == 0


def test_proxy_refuses_bad_numbers_with_400_and_a_reason(start_transport: Any) -> None:
    """``²`` passes ``str.isdigit`` but not ``int``; rport 99999 would not fit a WRITE record's port."""
    running = start_transport("--open-registrar", workers=1, router="proxy")
    via = "Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-{call_id}-{cseq}"
    cases = [
        ("mf-superscript", "Max-Forwards: 70", "Max-Forwards: ²", "Max-Forwards '²' is not 0..255"),
        ("mf-300", "Max-Forwards: 70", "Max-Forwards: 300", "Max-Forwards '300' is not 0..255"),
        ("rport", via, "Via: SIP/2.0/TCP 127.0.0.1:5999;rport=99999", "Via rport '99999' is not 1..65535"),
        ("via-port", via, "Via: SIP/2.0/TCP 127.0.0.1:²²", "Via port '²²' is not 1..65535"),
    ]
    with SipClient.connect(running) as client:
        for cseq, (call_id, old, new, detail) in enumerate(cases, start=1):
            request = sip_request("OPTIONS", cseq, call_id=call_id)
            client.send(request.replace(old.format(call_id=call_id, cseq=cseq).encode(), new.encode(), 1))
            answer = client.read_response()
            assert (answer.status, answer.reason) == (400, f"Bad Request ({detail})")
            assert answer.all("call-id") == [call_id]
    assert _counter(running, "sip_parse_error.answered") == len(cases)
    assert _counter(running, "router_errors") == 0
    assert "Traceback" not in running.log_text()


def test_unanswerable_request_closes_its_connection_and_is_counted(start_transport: Any) -> None:
    running = start_transport(workers=1)
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1, call_id="no-from", omit=["From"]))
        assert client.read_until_closed() == b""
    with SipClient.connect(running) as client:  # an ACK that does not parse cannot be answered either
        client.send(sip_request("ACK", 1, call_id="bad-ack").replace(b"Max-Forwards: 70", b"Max-Forwards: x"))
        assert client.read_until_closed() == b""
    with SipClient.connect(running) as client:  # the transport still serves
        client.send(sip_request("OPTIONS", 2, call_id="after"))
        assert client.read_response().status == 200
    assert _counter(running, "sip_parse_error.closed") == 2


def test_unparsable_response_is_dropped_but_counted(start_transport: Any) -> None:
    running = start_transport(workers=1)
    with SipClient.connect(running) as client:
        client.send(_response("bad-response").replace(b"SIP/2.0 200 OK", b"SIP/2.0 2000 OK"))
        client.send(sip_request("OPTIONS", 2, call_id="after-response"))
        assert client.read_response().all("call-id") == ["after-response"]
    wait_for(lambda: _counter(running, "sip_parse_error.response_dropped") == 1, what="dropped response counted")
    assert _counter(running, "sip_parse_error.closed") == 0


def test_other_sip_version_is_answered_505(start_transport: Any) -> None:
    running = start_transport(workers=1)
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1, call_id="v7").replace(b" SIP/2.0\r\n", b" SIP/7.0\r\n", 1))
        answer = client.read_response()
        assert (answer.status, answer.reason) == (
            505,
            "Version Not Supported (unsupported protocol version 'SIP/7.0')",
        )


def test_a_corrupt_worker_channel_restarts_the_worker_and_is_counted(
    start_transport: Callable[..., RunningTransport],
) -> None:
    running = start_transport(workers=1, router="tests.routers_for_tests:corrupt_channel")
    [before] = [w["pid"] for w in running.control("stats")["workers"]]
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", call_id="break-it", headers=[("X-Corrupt", "yes")]))
        wait_for(lambda: running.counters().get("worker_channel_broken") == 1, what="the broken channel counted")
        wait_for(
            lambda: [w for w in running.control("stats")["workers"] if w["alive"] and w["pid"] != before],
            what="a fresh worker",
        )
    running.worker_pids.append(before)  # the fixture checks it is gone too
    with SipClient.connect(running) as client:  # the new worker has channels again: traffic flows
        client.send(sip_request("OPTIONS", call_id="after"))
        assert client.read_response().status == 200
    assert "killing it to start a fresh one" in running.log_text()
