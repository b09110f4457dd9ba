"""Hostile WebSocket peers over WS and WSS: the twins of the stream and TLS abuse tests.

Every bad upgrade gets an HTTP 4xx and a close, every bad frame a close frame
with the code RFC 6455 names, every slow peer a timeout; each case is counted
once, and a good client on the same transport is served between them.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningTransport, sip_request, wait_for, write_config
from tests.wsclient import LOOPBACK, RawWs, parse_response, sip_over_ws, ws_connect

StartTransport = Callable[..., RunningTransport]
ORIGIN = "https://phone.example"
TIMEOUT = 0.5  # message_timeout and ws_handshake_timeout here
SLACK = 1.0  # the transport's timers fire on a 0.25 s tick, on a busy 2-core machine


def _start(start_transport: StartTransport, tmp_path: Path, **settings: object) -> RunningTransport:
    config = write_config(
        tmp_path, ws_allowed_origins=ORIGIN, ws_max_frame_bytes=1024, message_timeout=TIMEOUT,
        ws_handshake_timeout=TIMEOUT, **settings,
    )  # fmt: skip
    return start_transport("--config", str(config), workers=1, ws="127.0.0.1:0", wss="127.0.0.1:0")


@pytest.mark.parametrize("secure", [False, True], ids=["ws", "wss"])
def test_abusive_websocket_peers_are_refused_closed_and_counted(
    start_transport: StartTransport, tmp_path: Path, secure: bool
) -> None:
    running = _start(start_transport, tmp_path)
    started = time.monotonic()
    with ws_connect(running, secure, origin=ORIGIN) as good:
        cseq = 0

        def served() -> None:
            nonlocal cseq
            cseq += 1
            good.send(sip_over_ws(sip_request("OPTIONS", cseq, call_id="good")).decode())
            assert parse_response(good.recv(timeout=5)).header("cseq") == f"{cseq} OPTIONS"

        served()
        # Upgrades refused with a 4xx, then closed.
        for action, status in (
            (lambda raw: raw.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") or raw.read_head(), b"400"),
            (lambda raw: raw.upgrade(subprotocol=""), b"400"),
            (lambda raw: raw.upgrade(subprotocol="chat"), b"400"),
            (lambda raw: raw.upgrade(origin="https://evil.example"), b"403"),
            (lambda raw: raw.send(sip_request("OPTIONS", 1)) or raw.read_head(), b"400"),
        ):
            with RawWs(running, secure) as raw:
                head = action(raw)
                assert head.split(b" ")[1] == status, head
                raw.wait_closed()
            served()
        # Half an upgrade request, then silence: closed by the handshake timer, unanswered.
        with RawWs(running, secure) as raw:
            raw.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
            opened = time.monotonic()
            closed = raw.wait_closed(TIMEOUT + SLACK + 1.0)
            assert raw.buffer == b"" and TIMEOUT * 0.9 <= closed - opened < TIMEOUT + SLACK
        served()
        # Bad frames after a good upgrade: a close frame with the right code, then the close.
        for frame, code in (
            (lambda raw: raw.frame(0x1, b"hi", masked=False), 1002),
            (lambda raw: raw.frame(0x3, b"reserved opcode"), 1002),
            (lambda raw: raw.frame(0x1, b"\xff\xfe not UTF-8"), 1007),
            (lambda raw: raw.frame(0x1, b"x" * 2000), 1009),
        ):
            with RawWs(running, secure) as raw:
                assert raw.upgrade().startswith(b"HTTP/1.1 101 ")
                raw.send(frame(raw))
                assert raw.read_close_code() == code
                raw.wait_closed()
            served()
        # The first fragment of a message, then silence: closed by the message timer with 1008.
        with RawWs(running, secure) as raw:
            raw.upgrade()
            raw.send(raw.frame(0x1, b"OPTIONS sip:x SIP/2.0\r\n", fin=False))
            opened = time.monotonic()
            assert raw.read_close_code(TIMEOUT + SLACK + 1.0) == 1008
            assert TIMEOUT * 0.9 <= time.monotonic() - opened < TIMEOUT + SLACK
        # Not SIP at all: dropped and counted, as on TCP; a request that cannot be answered: closed.
        with RawWs(running, secure) as raw:
            raw.upgrade()
            raw.send(raw.frame(0x1, b"hello, is this SIP?"))
            raw.send(raw.frame(0x1, sip_over_ws(sip_request("OPTIONS", 1, call_id="no-from", omit=["From"]))))
            raw.wait_closed()
        served()
        bad = 12
        counters = wait_for(
            lambda: (c := running.counters()).get("closed", 0) == bad and c, what="every abusive connection closed"
        )
        ws_counters = {name: value for name, value in counters.items() if name.startswith(("ws_handshake_f", "ws_cl"))}
        assert ws_counters == {
            "ws_handshake_failed.not_upgrade": 1,
            "ws_handshake_failed.no_sip_subprotocol": 2,
            "ws_handshake_failed.origin": 1,
            "ws_handshake_failed.bad_http": 1,
            "ws_handshake_failed.timeout": 1,
            "ws_close.1002": 2,
            "ws_close.1007": 1,
            "ws_close.1009": 1,
            "ws_close.1008": 1,
        }
        assert counters["framing_error.message_timeout"] == 1 and counters["sip_parse_error.closed"] == 1
        assert counters["sip_parse_error.response_dropped"] == 1
        assert counters[f"accepted.{'wss' if secure else 'ws'}"] == 1 + bad
        assert counters["ws_handshakes"] == 1 + 6
        assert running.control("stats")["connections"] == 1  # only the good client is left
    assert time.monotonic() - started < 30.0
    log = running.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert "evil.example" in log  # the refused origin is logged (escaped, cut), once


def test_plaintext_to_the_wss_port_is_a_tls_failure(start_transport: StartTransport, tmp_path: Path) -> None:
    running = _start(start_transport, tmp_path)
    with socket.create_connection((LOOPBACK, running.wss_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\r\n")
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # OpenSSL's alert, or a reset: either way, closed
            while sock.recv(4096):
                pass
    counters = wait_for(lambda: (c := running.counters()).get("closed") == 1 and c, what="closed")
    assert counters["tls_handshake_failed.http_request"] == 1 and "ws_handshakes" not in counters


def test_quiet_websockets_are_pinged_and_closed_when_they_never_pong(
    start_transport: StartTransport, tmp_path: Path
) -> None:
    running = _start(start_transport, tmp_path, ws_ping_interval=0.5, idle_timeout=1.5)
    with ws_connect(running, False) as answering, RawWs(running, False) as silent:
        assert silent.upgrade().startswith(b"HTTP/1.1 101 ")
        opened = time.monotonic()
        assert silent.read_frame(timeout=3.0)[0] == 0x9  # a ping
        closed = silent.wait_closed(timeout=4.0)
        assert 0.9 <= closed - opened < 1.0 + 2 * SLACK
        time.sleep(3.0)  # twice idle_timeout: the client that answers pings stays
        answering.send(sip_over_ws(sip_request("OPTIONS", 1)).decode())
        assert parse_response(answering.recv(timeout=5)).status == 200
    counters = running.counters()
    assert counters["closed_ws_ping_timeout"] == 1 and counters["ws_pings_sent"] >= 3
    assert counters.get("closed_idle", 0) == 0
