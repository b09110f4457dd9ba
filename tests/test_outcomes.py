"""Write-job outcomes as a router sees them, over real loopback sockets.

The routers in :mod:`tests.routers_for_tests` send a write job and answer
the test's request with the outcome's result label (reason phrase and
``X-Outcome`` header), so each test checks exactly what the router got.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import RunningTransport, SipClient, SipResponse, sip_request, wait_for, write_config

SEND_AND_REPORT = "tests.routers_for_tests:send_and_report"
SEND_ON_AND_REPORT = "tests.routers_for_tests:send_on_and_report"
GATED_REPLY = "tests.routers_for_tests:gated_reply"


@contextlib.contextmanager
def peer_listener(backlog: int = 16, rcvbuf: int | None = None) -> Iterator[socket.socket]:
    """A test-owned listening socket on 127.0.0.1 (a SIP peer the transport connects to)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # inherited by accepted sockets
        sock.bind(("127.0.0.1", 0))
        sock.listen(backlog)
        sock.settimeout(5.0)
        yield sock
    finally:
        sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def probe(client: SipClient, cseq: int, **headers: str) -> SipResponse:
    """Ask the router for a write job; return its answer carrying the outcome."""
    fields = [(f"X-{name.replace('_', '-').title()}", value) for name, value in headers.items()]
    client.send(sip_request("OPTIONS", cseq, call_id="probe", headers=fields))
    return client.read_response()


def read_line(sock: socket.socket, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\r\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        assert chunk, f"peer closed before a whole line; got {data!r}"
        data += chunk
    return data


def connection_id(running: RunningTransport, remote_port: int) -> int:
    def find() -> int | None:
        for info in running.control("connections")["connections"]:
            if info["remote"] == f"127.0.0.1:{remote_port}":
                return int(info["id"])
        return None

    return int(wait_for(find, what=f"a connection from port {remote_port}"))


def test_job_to_a_listening_peer_is_sent_and_the_connection_reused(start_transport: Any) -> None:
    running = start_transport(workers=1, router=SEND_AND_REPORT)
    with peer_listener() as listener, SipClient.connect(running) as client:
        port = str(listener.getsockname()[1])
        first = probe(client, 1, target_port=port)
        assert (first.status, first.reason) == (200, "sent")
        assert first.all("x-outcome") == ["sent"]
        peer, _ = listener.accept()
        with peer:
            assert read_line(peer) == b"PROBE probe 1 OPTIONS\r\n"
            second = probe(client, 2, target_port=port)
            assert second.reason == "sent"
            assert read_line(peer) == b"PROBE probe 2 OPTIONS\r\n"
            # Both jobs went over the same outbound connection: no second connect.
            assert second.all("x-outcome-conn") == first.all("x-outcome-conn")
            outbound = [c for c in running.control("connections")["connections"] if c["outbound"]]
            assert [(c["remote"], c["messages_out"]) for c in outbound] == [(f"127.0.0.1:{port}", 2)]
            assert str(outbound[0]["id"]) == first.header("x-outcome-conn")
    counters = running.counters()
    assert counters["write.sent"] == 4  # two probes and the two answers
    assert counters["connects"] == 1


def test_a_callback_for_failures_only_still_hears_of_success_and_of_failure(start_transport: Any) -> None:
    """``failures_only`` spares the worker a wake-up per job: the ``sent`` comes late, but it comes."""
    running = start_transport(workers=1, router=SEND_AND_REPORT)
    with peer_listener() as listener, SipClient.connect(running) as client:
        port = str(listener.getsockname()[1])
        assert probe(client, 1, target_port=port, failures_only="yes").reason == "sent"
        listener.accept()[0].close()
        assert probe(client, 2, target_port=str(closed_port()), failures_only="yes").reason == "refused"


def test_connect_to_a_closed_port_is_refused(start_transport: Any) -> None:
    running = start_transport(workers=1, router=SEND_AND_REPORT)
    port = closed_port()
    with SipClient.connect(running) as client:
        answer = probe(client, 1, target_port=str(port))
        assert (answer.status, answer.reason) == (200, "refused")
        assert answer.all("x-outcome") == ["refused"]
        assert answer.all("x-outcome-reason") == [f"connect to 127.0.0.1:{port} failed: Connection refused"]
        # The next job tries again (nothing is cached for a failed destination).
        assert probe(client, 2, target_port=str(port)).reason == "refused"
    counters = running.counters()
    assert counters["write.refused"] == 2
    assert counters["connect_failed.refused"] == 2
    assert running.control("stats")["connections"] == 0


def test_bad_destination_is_reported(start_transport: Any) -> None:
    running = start_transport(workers=1, router=SEND_AND_REPORT)
    with SipClient.connect(running) as client:
        port_zero = probe(client, 1, target_port="0")
        assert (port_zero.status, port_zero.reason) == (200, "bad_destination")
        assert port_zero.all("x-outcome-reason") == ["port 0 is out of range"]
        assert port_zero.all("x-outcome-conn") == ["0"]
    assert running.counters()["write.bad_destination"] == 1
    assert running.counters().get("connects", 0) == 0


def test_connect_timeout_when_the_peer_backlog_is_full(start_transport: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, connect_timeout=0.5)
    running = start_transport("--config", str(config), workers=1, router=SEND_AND_REPORT)
    with peer_listener(backlog=0) as listener, socket.socket() as filler, SipClient.connect(running) as client:
        # backlog 0 holds one not-yet-accepted connection; with it queued, Linux drops further SYNs.
        filler.settimeout(2.0)
        filler.connect(listener.getsockname())
        started = time.monotonic()
        answer = probe(client, 1, target_port=str(listener.getsockname()[1]))
        elapsed = time.monotonic() - started
        assert (answer.status, answer.reason) == (200, "timeout")
        port = listener.getsockname()[1]
        assert answer.all("x-outcome-reason") == [f"connect to 127.0.0.1:{port} timed out after 0.5s"]
        assert 0.5 <= elapsed < 3.0
    counters = running.counters()
    assert counters["write.timeout"] == 1
    assert counters["connect_failed.timeout"] == 1


def _answer_or_stall(client: SipClient, running: RunningTransport, timeout: float = 5.0) -> SipResponse | None:
    """The next answer, or None while the transport holds bytes it cannot send yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.buffer or select.select([client.sock], [], [], 0.02)[0]:
            return client.read_response()
        if running.control("stats")["pending_write_bytes"] > 0:
            return None
    raise AssertionError(f"neither an answer nor a queued write within {timeout}s")


def test_stalled_peer_makes_jobs_fail_with_queue_full(start_transport: Any, tmp_path: Path) -> None:
    """Jobs of exactly the cap each: once any byte is stuck, the next job cannot fit."""
    cap = 65536
    config = write_config(tmp_path, write_queue_bytes=cap)
    running = start_transport("--config", str(config), workers=1, router=SEND_AND_REPORT)
    with peer_listener(rcvbuf=4096) as listener, SipClient.connect(running) as client:
        port = str(listener.getsockname()[1])
        peer = None
        unanswered: list[int] = []
        refused: SipResponse | None = None
        try:
            for cseq in range(1, 301):  # the kernel buffers a few MB at most before the peer stalls
                headers = [("X-Target-Port", port), ("X-Payload-Bytes", str(cap))]
                client.send(sip_request("OPTIONS", cseq, call_id="flood", headers=headers))
                unanswered.append(cseq)
                if peer is None:
                    peer, _ = listener.accept()  # accepted, never read
                while (answer := _answer_or_stall(client, running)) is not None:
                    answered = int((answer.header("cseq") or "0").split()[0])
                    unanswered.remove(answered)
                    if answer.reason != "sent":
                        refused = answer
                        break
                    if not unanswered:
                        break
                if refused is not None:
                    break
            assert refused is not None, "the peer never stalled"
            assert refused.reason == "queue_full"
            reason = refused.header("x-outcome-reason") or ""
            assert reason.endswith(f"bytes queued; limit {cap}"), reason
            assert running.counters()["write.queue_full"] == 1
            assert len(unanswered) == 1  # the one job whose bytes are stuck
            listed = [c for c in running.control("connections")["connections"] if c["outbound"]]
            assert len(listed) == 1
            assert 0 < listed[0]["pending_write_bytes"] <= cap
        finally:
            if peer is not None:
                peer.close()  # with unread data: the kernel answers with a reset
        # The stuck job learns its fate when the peer goes away.
        last = client.read_response()
        assert last.all("cseq") == [f"{unanswered[0]} OPTIONS"]
        assert last.reason == "reset"
    assert running.counters()["write.reset"] == 1
    wait_for(lambda: running.control("stats")["pending_write_bytes"] == 0, what="the queue to be released")


def test_send_on_a_closed_connection_is_connection_gone(start_transport: Any) -> None:
    running = start_transport(workers=1, router=SEND_ON_AND_REPORT)
    with SipClient.connect(running) as client, SipClient.connect(running) as target:
        target_id = connection_id(running, target.local_port)
        answer = probe(client, 1, target_conn=str(target_id))
        assert answer.reason == "sent"
        assert answer.all("x-outcome-conn") == [str(target_id)]
        assert target.read_exact(len(b"SEND-ON PROBE\r\n")) == b"SEND-ON PROBE\r\n"

        target.close()
        wait_for(
            lambda: all(c["id"] != target_id for c in running.control("connections")["connections"]),
            what="the closed connection to be gone",
        )
        gone = probe(client, 2, target_conn=str(target_id))
        assert (gone.status, gone.reason) == (200, "connection_gone")
        assert gone.all("x-outcome-reason") == [f"connection {target_id} is closed"]
        assert gone.all("x-outcome-conn") == [str(target_id)]
    assert running.counters()["write.connection_gone"] == 1


def test_reply_after_the_peer_left_is_connection_gone(start_transport: Any, tmp_path: Path) -> None:
    running = start_transport(workers=1, router=GATED_REPLY)
    gate = tmp_path / "gate"
    with peer_listener() as reporter:
        client = SipClient.connect(running)
        conn_id = connection_id(running, client.local_port)
        client.send(
            sip_request(
                "OPTIONS",
                1,
                call_id="gated",
                headers=[("X-Gate", str(gate)), ("X-Report-Port", str(reporter.getsockname()[1]))],
            )
        )
        wait_for(lambda: running.control("stats")["dispatch_in_flight"] == 1, what="the request to reach the worker")
        client.close()
        wait_for(lambda: running.control("stats")["connections"] == 0, what="the transport to see the close")
        gate.touch()  # now the router replies, to a connection that is gone
        report_conn, _ = reporter.accept()
        with report_conn:
            assert read_line(report_conn) == f"OUTCOME connection_gone {conn_id}\r\n".encode()
    assert running.counters()["write.connection_gone"] == 1


def test_peer_that_never_reads_is_closed_after_send_timeout(start_transport: Any, tmp_path: Path) -> None:
    """A job stuck behind a peer that reads nothing fails with `timeout` once send_timeout passes."""
    config = write_config(tmp_path, send_timeout=1.0, write_queue_bytes=1 << 24)
    running = start_transport("--config", str(config), workers=1, router=SEND_AND_REPORT)
    with peer_listener(rcvbuf=4096) as listener, SipClient.connect(running) as client:
        port = str(listener.getsockname()[1])
        headers = [("X-Target-Port", port), ("X-Payload-Bytes", str(900_000))]
        for cseq in range(1, 11):  # 9 MB: more than the kernel buffers for a peer that reads nothing
            client.send(sip_request("OPTIONS", cseq, call_id="stall", headers=headers))
        peer, _ = listener.accept()  # accepted, never read
        try:
            started = time.monotonic()
            reasons = [client.read_response(timeout=10.0).reason for _ in range(10)]
            elapsed = time.monotonic() - started
        finally:
            peer.close()
    assert set(reasons) == {"sent", "timeout"}, reasons
    assert reasons.index("timeout") == reasons.count("sent")  # sent ones first, then the stuck ones
    assert elapsed >= 1.0
    assert running.counters()["closed_send_timeout"] == 1


def test_job_larger_than_a_record_is_too_large(start_transport: Any) -> None:
    running = start_transport(workers=1, router=SEND_AND_REPORT)
    with SipClient.connect(running) as client:
        answer = probe(client, 1, target_port=str(closed_port()), payload_bytes=str(2 << 20))
    assert answer.reason == "too_large"
    assert "exceed the" in (answer.header("x-outcome-reason") or "")
