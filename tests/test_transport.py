"""Integration tests of the transport over real loopback sockets with real worker processes.

Every test starts its own ``sipwire transport`` child process (see the
``start_transport`` fixture) and talks SIP to it as a peer would.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import (
    REPO,
    START_TIMEOUT,
    RunningTransport,
    SipClient,
    SipResponse,
    pid_alive,
    sip_request,
    stop_process,
    wait_for,
    write_config,
)
from tests.router_slow_setup import MARK_VARIABLE, SETUP_SECONDS
from tests.sipp import free_port

SLOW_ROUTER = "tests.routers_for_tests:slow"
VIA = "SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-{call_id}-{cseq}"
FROM = "<sip:alice@127.0.0.1>;tag=from-tag-1"
TO = "<sip:service@127.0.0.1>"
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, REGISTER, INFO, UPDATE, MESSAGE, NOTIFY"


def _assert_copied(response: SipResponse, call_id: str, cseq: int, method: str) -> None:
    """Via, From, Call-ID and CSeq copied from the request; To copied with a tag added."""
    assert response.all("via") == [VIA.format(call_id=call_id, cseq=cseq)]
    assert response.all("from") == [FROM]
    to = response.header("to")
    assert to is not None and to.startswith(f"{TO};tag=")
    assert len(to) > len(f"{TO};tag=")
    assert response.all("call-id") == [call_id]
    assert response.all("cseq") == [f"{cseq} {method}"]
    assert response.all("content-length") == [str(len(response.body))]


def _counter(running: RunningTransport, name: str) -> int:
    return running.counters().get(name, 0)


# -- 1. the responder router ---------------------------------------------------------------------


def test_responder_answers_every_method(start_transport: Any) -> None:
    running = start_transport(workers=2)
    with SipClient.connect(running) as client:
        for cseq, method in enumerate(("OPTIONS", "REGISTER", "BYE", "CANCEL"), start=1):
            client.send(sip_request(method, cseq, call_id=f"m-{method}"))
            response = client.read_response()
            assert (response.status, response.reason) == (200, "OK")
            _assert_copied(response, f"m-{method}", cseq, method)
            assert response.body == b""
            if method == "OPTIONS":
                assert response.all("allow") == [ALLOW]
                assert response.all("accept") == ["application/sdp"]

        client.send(
            sip_request(
                "REGISTER",
                10,
                call_id="reg",
                headers=[("Contact", "<sip:alice@127.0.0.1:5999>"), ("Expires", "600")],
            )
        )
        register = client.read_response()
        assert register.status == 200
        assert register.all("contact") == ["<sip:alice@127.0.0.1:5999>;expires=600"]

        sdp_offer = (
            b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 5004 RTP/AVP 0\r\n"
        )
        client.send(
            sip_request("INVITE", 20, call_id="inv", headers=[("Content-Type", "application/sdp")], body=sdp_offer)
        )
        invite = client.read_response()
        assert (invite.status, invite.reason) == (200, "OK")
        _assert_copied(invite, "inv", 20, "INVITE")
        assert invite.all("content-type") == ["application/sdp"]
        assert invite.all("contact") == [f"<sip:sipwire@127.0.0.1:{running.port};transport=tcp>"]
        assert invite.all("content-length") == [str(len(invite.body))]
        assert invite.body.startswith(b"v=0\r\n")
        assert b"c=IN IP4 127.0.0.1\r\n" in invite.body
        assert b"m=audio 6000 RTP/AVP 0\r\n" in invite.body
        assert invite.body.endswith(b"\r\n")

        # ACK gets no answer: the next bytes on the connection are the answer to the OPTIONS after it.
        client.send(sip_request("ACK", 20, call_id="inv") + sip_request("OPTIONS", 21, call_id="after-ack"))
        after_ack = client.read_response()
        assert after_ack.all("call-id") == ["after-ack"]
        assert after_ack.all("cseq") == ["21 OPTIONS"]

        # A method it knows but does not serve gets 405, one it does not know 501 (RFC 3261 sections 8.2.1, 21.5.2).
        unserved = ((30, "PUBLISH", 405, "Method Not Allowed"), (31, "FOO", 501, "Not Implemented"))
        for cseq, method, status, reason in unserved:
            client.send(sip_request(method, cseq, call_id=f"x-{method}"))
            response = client.read_response()
            assert (response.status, response.reason) == (status, reason)
            _assert_copied(response, f"x-{method}", cseq, method)
            assert response.all("allow") == [ALLOW]
        assert client.buffer == bytearray()
    counters = running.counters()
    assert counters["messages_in"] == 10


def test_rport_is_filled_with_the_source_port(start_transport: Any) -> None:
    running = start_transport(workers=1)
    with SipClient.connect(running) as client:
        request = sip_request("OPTIONS", 1, branch="z9hG4bK-rport").replace(
            b"branch=z9hG4bK-rport", b"branch=z9hG4bK-rport;rport"
        )
        client.send(request)
        response = client.read_response()
        expected = f"SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-rport;rport={client.local_port};received=127.0.0.1"
        assert response.all("via") == [expected]


def test_pipelined_requests_answered_in_order_per_connection(start_transport: Any) -> None:
    running = start_transport(workers=2)
    count = 30
    clients = [SipClient.connect(running) for _ in range(3)]
    try:
        for index, client in enumerate(clients):
            batch = b"".join(sip_request("OPTIONS", cseq, call_id=f"pipe-{index}") for cseq in range(1, count + 1))
            client.send(batch)
        for index, client in enumerate(clients):
            answers = [client.read_response() for _ in range(count)]
            assert [r.all("cseq") for r in answers] == [[f"{cseq} OPTIONS"] for cseq in range(1, count + 1)]
            assert {r.header("call-id") for r in answers} == {f"pipe-{index}"}
            assert all(r.status == 200 for r in answers)
            assert client.buffer == bytearray()
    finally:
        for client in clients:
            client.close()
    assert running.counters()["messages_in"] == 3 * count


def test_busy_polling_answers_as_usual_and_stops_polling_once_idle(start_transport: Any) -> None:
    """``busy_poll_us``: fast answers, slow answers (the poll ends, the loop sleeps again) and an idle
    transport that does not spin (polling lasts only a moment after activity)."""
    running = start_transport(workers=1, router=SLOW_ROUTER, busy_poll_us=2000)
    with SipClient.connect(running) as client:
        for cseq in range(1, 21):
            client.send(sip_request("OPTIONS", cseq))
            assert client.read_response().all("cseq") == [f"{cseq} OPTIONS"]
        client.send(sip_request("OPTIONS", 21, headers=[("X-Sleep", "0.1")]))  # held past the poll window
        assert client.read_response().all("cseq") == ["21 OPTIONS"]

        def cpu_seconds(pid: int) -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        pids = [running.process.pid, *running.worker_pids]
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(1.0)
        spent = [cpu_seconds(pid) - earlier for pid, earlier in zip(pids, before, strict=True)]
        assert max(spent) < 0.3, f"CPU seconds over one idle second (transport, worker): {spent}"


def test_cpu_affinity_puts_the_io_threads_and_the_workers_on_the_cpus_asked(start_transport: Any) -> None:
    cpu = max(os.sched_getaffinity(0))
    running = start_transport(workers=2, cpu_affinity=str(cpu))

    def allowed(pid: int, tid: int | None = None) -> str:
        status = Path(f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status").read_text()
        return next(line.split(":")[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))

    threads = [int(task.name) for task in Path(f"/proc/{running.process.pid}/task").iterdir()]
    assert len(threads) > 1 and {allowed(running.process.pid, tid) for tid in threads} == {str(cpu)}
    assert {allowed(pid) for pid in running.worker_pids} == {str(cpu)}
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1))
        assert client.read_response().status == 200


def test_message_split_over_many_small_sends(start_transport: Any) -> None:
    running = start_transport(workers=1)
    body = b"v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    request = sip_request("INVITE", 7, call_id="split", headers=[("Content-Type", "application/sdp")], body=body)
    with SipClient.connect(running) as client:
        sends = 0
        for start in range(0, len(request), 5):
            client.send(request[start : start + 5])
            sends += 1
        assert sends > 60
        response = client.read_response()
        assert response.status == 200
        _assert_copied(response, "split", 7, "INVITE")
    assert running.counters()["messages_in"] == 1


def test_keepalive_ping_answered_with_exactly_one_crlf(start_transport: Any) -> None:
    running = start_transport(workers=1)
    with SipClient.connect(running) as client:
        client.send(b"\r\n\r\n")
        assert client.read_exact(2) == b"\r\n"
        client.send(sip_request("OPTIONS", 1, call_id="after-ping"))
        response = client.read_response()
        assert response.raw.startswith(b"SIP/2.0 200 OK\r\n")
        assert response.all("call-id") == ["after-ping"]
        # A lone CRLF (a pong from the peer) is not answered at all.
        client.send(b"\r\n" + sip_request("OPTIONS", 2, call_id="after-pong"))
        response = client.read_response()
        assert response.raw.startswith(b"SIP/2.0 200 OK\r\n")
        assert response.all("call-id") == ["after-pong"]
    counters = running.counters()
    assert counters["keepalive_pings"] == 1
    assert counters["messages_in"] == 2


# -- 2. bad input --------------------------------------------------------------------------------

FRAMING_CASES = (
    ("missing", {"omit": ["Content-Length"]}, "missing_content_length"),
    ("negative", {"content_length": "-5"}, "bad_content_length"),
    ("duplicate", {"headers": [("Content-Length", "0")]}, "duplicate_content_length"),
    ("non-numeric", {"content_length": "abc"}, "bad_content_length"),
)


def test_framing_errors_answer_400_and_close_only_that_connection(start_transport: Any) -> None:
    running = start_transport(workers=2)
    with SipClient.connect(running) as bystander:
        for cseq, (name, options, reason) in enumerate(FRAMING_CASES, start=1):
            with SipClient.connect(running) as client:
                client.send(sip_request("OPTIONS", cseq, call_id=f"bad-{name}", **options))
                answer = client.read_response()
                assert (answer.status, answer.reason) == (400, f"Bad Request ({reason})"), name
                _assert_copied(answer, f"bad-{name}", cseq, "OPTIONS")
                assert client.read_until_closed() == b"", name
            bystander.send(sip_request("OPTIONS", cseq, call_id="bystander"))
            assert bystander.read_response().all("cseq") == [f"{cseq} OPTIONS"]

        # Without the headers an answer needs, the connection is closed without one.
        with SipClient.connect(running) as client:
            client.send(sip_request("OPTIONS", 9, omit=["Content-Length", "Call-ID"]))
            assert client.read_until_closed() == b""
    counters = running.counters()
    assert counters["framing_error.missing_content_length"] == 2
    assert counters["framing_error.bad_content_length"] == 2
    assert counters["framing_error.duplicate_content_length"] == 1
    assert counters["messages_in"] == len(FRAMING_CASES)  # the bystander's requests only
    wait_for(lambda: running.control("stats")["connections"] == 0, what="every connection to be closed")


def test_good_request_ahead_of_a_framing_error_is_still_answered(start_transport: Any) -> None:
    running = start_transport(workers=1)
    with SipClient.connect(running) as client:
        bad = sip_request("OPTIONS", 2, call_id="bad", omit=["Content-Length"])
        client.send(sip_request("OPTIONS", 1, call_id="good") + bad)
        answers = [client.read_response(), client.read_response()]
        # SIP matches responses by transaction, not position: both must come, in either order.
        by_call = {answer.header("call-id"): answer for answer in answers}
        assert set(by_call) == {"good", "bad"}
        assert (by_call["good"].status, by_call["good"].all("cseq")) == (200, ["1 OPTIONS"])
        assert (by_call["bad"].status, by_call["bad"].reason) == (400, "Bad Request (missing_content_length)")
        assert client.read_until_closed() == b""
    counters = running.counters()
    assert counters["messages_in"] == 1
    assert counters["framing_error.missing_content_length"] == 1


def test_size_limits_answer_513_and_413_then_close(start_transport: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, max_header_bytes=1024, max_message_bytes=2048)
    running = start_transport("--config", str(config), workers=1)
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1, call_id="big-headers", headers=[("X-Pad", "a" * 1200)]))
        answer = client.read_response()
        assert (answer.status, answer.reason) == (513, "Message Too Large (headers_too_large)")
        _assert_copied(answer, "big-headers", 1, "OPTIONS")
        assert client.read_until_closed() == b""
    with SipClient.connect(running) as client:
        # Only the header block is sent: the framer refuses the message as soon as it knows its size.
        request = sip_request("MESSAGE", 2, call_id="big-body", content_length="4000")
        client.send(request)
        answer = client.read_response()
        assert (answer.status, answer.reason) == (413, "Request Entity Too Large (message_too_large)")
        _assert_copied(answer, "big-body", 2, "MESSAGE")
        assert client.read_until_closed() == b""
    with SipClient.connect(running) as client:
        # Just under both limits: served.
        body = b"x" * (2048 - len(sip_request("MESSAGE", 3, call_id="fits", content_length="1000")))
        request = sip_request("MESSAGE", 3, call_id="fits", body=body)
        assert len(request) == 2048
        client.send(request)
        assert client.read_response().status == 200
    counters = running.counters()
    assert counters["framing_error.headers_too_large"] == 1
    assert counters["framing_error.message_too_large"] == 1
    assert counters["messages_in"] == 1


def test_unparsable_request_answered_400_and_connection_stays_open(start_transport: Any) -> None:
    running = start_transport(workers=1)
    with SipClient.connect(running) as client:
        bad = sip_request("OPTIONS", 1, call_id="no-colon").replace(
            b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\nBogus header line\r\n"
        )
        client.send(bad)
        answer = client.read_response()
        assert (answer.status, answer.reason) == (400, "Bad Request (header line without a colon: 'Bogus header line')")
        _assert_copied(answer, "no-colon", 1, "OPTIONS")
        client.send(sip_request("OPTIONS", 2, call_id="still-open"))
        response = client.read_response()
        assert response.status == 200
        assert response.all("call-id") == ["still-open"]
        listed = running.control("connections")["connections"]
        assert [c["remote"] for c in listed] == [f"127.0.0.1:{client.local_port}"]
        assert listed[0]["messages_in"] == 2
    assert running.counters().get("framing_error.bad_content_length", 0) == 0


def test_message_timeout_closes_a_half_sent_message(start_transport: Any, tmp_path: Path) -> None:
    running = start_transport("--config", str(write_config(tmp_path, message_timeout=0.5)), workers=1)
    request = sip_request("OPTIONS", 1, call_id="half")
    with SipClient.connect(running) as client:
        client.send(request[:40])
        started = time.monotonic()
        assert client.read_until_closed(timeout=5.0) == b""
        elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 3.0
    assert _counter(running, "framing_error.message_timeout") == 1


def test_message_timeout_is_per_message_on_a_busy_stream(start_transport: Any, tmp_path: Path) -> None:
    """Each message completes quickly, but every read ends inside the next one: no timeout."""
    running = start_transport("--config", str(write_config(tmp_path, message_timeout=0.5)), workers=1)
    messages = [sip_request("OPTIONS", cseq, call_id="busy") for cseq in range(1, 8)]
    with SipClient.connect(running) as client:
        half = len(messages[0]) // 2
        client.send(messages[0][:half])
        for cseq in range(1, len(messages)):
            time.sleep(0.25)  # pacing, not an assertion: each message takes 0.25 s < message_timeout
            client.send(messages[cseq - 1][half:] + messages[cseq][:half])
            assert client.read_response().all("cseq") == [f"{cseq} OPTIONS"]
        client.send(messages[-1][half:])
        assert client.read_response().all("cseq") == [f"{len(messages)} OPTIONS"]
    assert _counter(running, "framing_error.message_timeout") == 0


def test_idle_timeout_closes_idle_connections_only(start_transport: Any, tmp_path: Path) -> None:
    running = start_transport("--config", str(write_config(tmp_path, idle_timeout=0.8)), workers=1)
    with SipClient.connect(running) as idle, SipClient.connect(running) as busy:
        started = time.monotonic()
        closed_after = 0.0
        for cseq in range(1, 7):
            busy.send(sip_request("OPTIONS", cseq, call_id="busy"))
            assert busy.read_response().status == 200
            if not closed_after and select.select([idle.sock], [], [], 0)[0]:
                assert idle.read_until_closed() == b""
                closed_after = time.monotonic() - started
            time.sleep(0.3)  # pacing: traffic every 0.3 s keeps this one alive
        assert 0.8 <= closed_after < 1.8, closed_after
        busy.send(sip_request("OPTIONS", 9, call_id="busy"))
        assert busy.read_response().all("cseq") == ["9 OPTIONS"]
    assert _counter(running, "closed_idle") == 1
    counters = running.counters()
    assert counters["messages_in"] == 7


def test_max_connections_refuses_extra_connections(start_transport: Any, tmp_path: Path) -> None:
    running = start_transport("--config", str(write_config(tmp_path, max_connections=3)), workers=1)
    clients = [SipClient.connect(running) for _ in range(3)]
    try:
        for index, client in enumerate(clients):
            client.send(sip_request("OPTIONS", 1, call_id=f"c{index}"))
            assert client.read_response().status == 200
        with SipClient.connect(running) as extra:
            assert extra.read_until_closed() == b""
        assert running.counters()["refused.max_connections"] == 1
        clients.pop().close()
        wait_for(lambda: running.control("stats")["connections"] == 2, what="the closed connection to be gone")
        with SipClient.connect(running) as again:
            again.send(sip_request("OPTIONS", 1, call_id="again"))
            assert again.read_response().status == 200
        for client in clients:
            client.send(sip_request("OPTIONS", 2, call_id="still"))
            assert client.read_response().all("cseq") == ["2 OPTIONS"]
    finally:
        for client in clients:
            client.close()
    assert running.counters()["refused.max_connections"] == 1
    assert "max_connections 3 reached" in running.log_text()


# -- 3. worker death -----------------------------------------------------------------------------


def test_killed_worker_is_restarted_and_its_messages_counted_lost(start_transport: Any) -> None:
    running = start_transport(workers=2, router=SLOW_ROUTER)
    with SipClient.connect(running) as client:
        batch = b"".join(
            sip_request("OPTIONS", cseq, call_id="doomed", headers=[("X-Sleep", "1.5")]) for cseq in (1, 2, 3)
        )
        client.send(batch)
        busy = wait_for(
            lambda: [w for w in running.control("stats")["workers"] if w["in_flight"] == 3],
            what="three messages in flight on one worker",
        )[0]
        victim_pid = busy["pid"]
        os.kill(victim_pid, signal.SIGKILL)

        def restarted() -> dict[str, Any] | None:
            worker = running.control("stats")["workers"][busy["index"]]
            return worker if worker["alive"] and worker["pid"] != victim_pid else None

        replacement = wait_for(restarted, what="the worker to be restarted")
        running.worker_pids.append(replacement["pid"])
        assert not pid_alive(victim_pid)
        assert replacement["restarts"] == 1
        wait_for(lambda: running.counters().get("lost_messages") == 3, what="3 lost messages counted")
        assert running.control("stats")["dispatch_in_flight"] == 0
        log = running.log_text()
        assert f"worker {busy['index']} (pid {victim_pid}) exited with status -9; restarting it" in log
        assert "with 3 in-flight messages" in log
        assert "counted as lost" in log

        # Traffic goes on, on the same connection and on new ones.
        client.send(sip_request("OPTIONS", 4, call_id="after"))
        response = client.read_response()
        assert response.all("cseq") == ["4 OPTIONS"]
        assert client.buffer == bytearray()  # the lost messages were never answered
    with SipClient.connect(running) as fresh:
        fresh.send(sip_request("OPTIONS", 1, call_id="fresh"))
        assert fresh.read_response().status == 200
    assert running.counters()["lost_messages"] == 3


# -- 6. start-up ---------------------------------------------------------------------------------


def _start_with_slow_setup(tmp_path: Path, port: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A transport on ``port`` whose one worker's router setup takes a second; (process, setup mark, log)."""
    mark = tmp_path / "setup-done"
    log_path = tmp_path / "transport.log"
    command = [
        sys.executable, "-m", "sipwire.cli", "transport", "--instance", "slowstart", "--state-dir", str(tmp_path),
        "--tcp", f"127.0.0.1:{port}", "--tls", "127.0.0.1:0", "--workers", "1", "--threads", "1",
        "--router", "tests.router_slow_setup:route",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), MARK_VARIABLE: str(mark)}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return process, mark, log_path


def test_the_port_opens_only_once_the_workers_can_route(tmp_path: Path) -> None:
    """A phone that connects as soon as the port answers is served at once, not parked behind a worker's start."""
    port = free_port(socket.SOCK_STREAM)
    process, mark, _ = _start_with_slow_setup(tmp_path, port)
    try:
        sock = wait_for(lambda: _connected(port), timeout=SETUP_SECONDS + START_TIMEOUT, what="the port to open")
        assert mark.exists(), "a connection was accepted before the worker's router setup had finished"
        with SipClient(sock) as client:
            client.send(sip_request("OPTIONS", 1, call_id="first-caller"))
            assert client.read_response().status == 200
    finally:
        stop_process(process)


def test_an_address_taken_while_the_workers_start_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    port = free_port(socket.SOCK_STREAM)
    with socket.socket() as rival:  # bound like the transport, so both binds pass; the first to listen wins
        rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rival.bind(("127.0.0.1", port))
        process, _, log_path = _start_with_slow_setup(tmp_path, port)
        try:
            wait_for(lambda: "worker 0 started" in log_path.read_text(errors="replace"), what="the worker to start")
            rival.listen()
            assert process.wait(SETUP_SECONDS + START_TIMEOUT) == 1
        finally:
            stop_process(process)
    assert f"cannot listen on TCP 127.0.0.1:{port}: Address already in use" in log_path.read_text()


def _connected(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=1.0)
    except ConnectionRefusedError:
        return None


# -- 7. clean shutdown ---------------------------------------------------------------------------


def test_sigterm_delivers_the_answer_in_flight_then_exits_zero(start_transport: Any) -> None:
    running = start_transport(workers=2, router=SLOW_ROUTER)
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1, call_id="last-words", headers=[("X-Sleep", "0.8")]))
        wait_for(lambda: running.control("stats")["dispatch_in_flight"] == 1, what="the request to be in flight")
        sent_at = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        response = client.read_response(timeout=5.0)
        assert response.status == 200
        assert response.all("call-id") == ["last-words"]
        assert time.monotonic() - sent_at < 2.0 + 0.5  # within shutdown_grace (2 s by default)
        assert client.read_until_closed() == b""
    assert running.process.wait(10.0) == 0
    log = running.log_text()
    assert "shutting down" in log
    assert "transport stopped" in log
    for pid in running.worker_pids:
        wait_for(lambda pid=pid: not pid_alive(pid), what=f"worker {pid} to exit")
