"""SIP over WebSocket (RFC 7118) through a real transport and real workers, with the ``websockets`` client.

WS and WSS listeners are off unless given; once on, their connections are
served by the same I/O threads, workers, limits, resize and stats block as
TCP and TLS ones, and show up as ``ws`` / ``wss`` everywhere a transport is
named. Bad input is in test_websocket_abuse.py; a browser SIP stack in
test_ws_browser.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from sipwire.transport.sip import parse
from sipwire.transport.sipresponse import build_response
from tests.conftest import RunningTransport, SipClient, run_ctl, sip_request, wait_for
from tests.sipphone import Phone
from tests.wsclient import parse_response, sip_over_ws, ws_connect

StartTransport = Callable[..., RunningTransport]
WEBSOCKETS = {"ws": "127.0.0.1:0", "wss": "127.0.0.1:0"}


def test_websocket_listeners_are_off_unless_given(start_transport: StartTransport) -> None:
    running = start_transport(workers=1)
    assert set(running.control("health")["listening"]) == {"tcp", "tls"}
    running = start_transport(workers=1, tls="", **WEBSOCKETS)
    assert set(running.control("health")["listening"]) == {"tcp", "ws", "wss"}  # WSS needs no TLS listener


@pytest.mark.parametrize("secure", [False, True], ids=["ws", "wss"])
def test_responder_over_websocket(start_transport: StartTransport, secure: bool) -> None:
    running = start_transport(workers=2, **WEBSOCKETS)
    via = "WSS" if secure else "WS"
    with ws_connect(running, secure) as ws:
        assert ws.subprotocol == "sip"
        ws.send(sip_over_ws(sip_request("OPTIONS", 1, call_id="ws-options"), via).decode())
        answer = parse_response(ws.recv(timeout=5))
        assert (answer.status, answer.all("call-id")) == (200, ["ws-options"])
        local_port = ws.local_address[1]
        assert answer.header("via") == (
            f"SIP/2.0/{via} df7jal23ls0d.invalid;branch=z9hG4bK-ws-options-1;received=127.0.0.1"
        )
        # Five requests back to back, one of them fragmented and one binary: five answers, in order.
        for cseq in range(2, 7):
            request = sip_over_ws(sip_request("OPTIONS", cseq, call_id="ws-burst"), via)
            if cseq == 3:
                ws.send([request[:20].decode(), request[20:].decode()])  # a message in two frames
            elif cseq == 4:
                ws.send(request)  # binary
            else:
                ws.send(request.decode())
        cseqs = [parse_response(ws.recv(timeout=5)).header("cseq") for _ in range(5)]
        assert cseqs == [f"{cseq} OPTIONS" for cseq in range(2, 7)]
        ws.send("\r\n\r\n")  # SIP.js's keep-alive over WebSocket: answered with one CRLF message
        assert ws.recv(timeout=5) == "\r\n"
        [conn] = [c for c in running.control("connections")["connections"] if c["remote"].endswith(f":{local_port}")]
        assert conn["transport"] == ("wss" if secure else "ws")
        assert conn["state"] == "open" and conn["messages_in"] == 6
        assert bool(conn["tls_version"]) is secure
    counters = wait_for(lambda: (c := running.counters()).get("closed") == 1 and c, what="the WebSocket closed")
    name = "wss" if secure else "ws"
    assert counters[f"accepted.{name}"] == 1 and counters["ws_handshakes"] == 1
    assert counters["ws_peer_close.1000"] == 1 and counters["keepalive_pings"] == 1
    assert counters.get("tls_handshakes", 0) == (1 if secure else 0)
    assert counters.get("framing_error.message_timeout", 0) == 0


def test_ctl_and_stats_name_ws_and_wss(start_transport: StartTransport) -> None:
    running = start_transport(workers=1, **WEBSOCKETS)
    with ws_connect(running, False) as plain, ws_connect(running, True) as secure, SipClient.connect(running) as tcp:
        for ws, via in ((plain, "WS"), (secure, "WSS")):
            ws.send(sip_over_ws(sip_request("OPTIONS", 1), via).decode())
            assert parse_response(ws.recv(timeout=5)).status == 200
        tcp.send(sip_request("OPTIONS", 1))
        assert tcp.read_response().status == 200

        def listed() -> dict[str, Any] | None:
            result = run_ctl(running, "connections", "--json")
            assert result.returncode == 0, result.stderr
            view: dict[str, Any] = json.loads(result.stdout)
            return view if len(view["connections"]) == 3 else None

        view = wait_for(listed, what="three connections in the stats block")
        assert sorted(c["transport"] for c in view["connections"]) == ["tcp", "ws", "wss"]
        stats = json.loads(run_ctl(running, "stats", "--json").stdout)
        assert stats["ws_handshake_ms"]["count"] == 2 and stats["tls_handshake_ms"]["count"] == 1
        assert stats["counters"]["accepted.ws"] == 1 and stats["counters"]["accepted.wss"] == 1
        health = run_ctl(running, "health", "--json")
        assert set(json.loads(health.stdout)["listening"]) == {"tcp", "tls", "ws", "wss"}


def test_websockets_move_with_a_pool_shrink_and_keep_working(start_transport: StartTransport) -> None:
    running = start_transport(workers=1, threads=3, **WEBSOCKETS)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_connect(running, secure=index % 2 == 1)) for index in range(6)]
        for index, ws in enumerate(clients):
            ws.send(sip_over_ws(sip_request("OPTIONS", 1, call_id=f"before-{index}")).decode())
            assert parse_response(ws.recv(timeout=5)).status == 200
        assert {c["thread"] for c in running.control("connections")["connections"]} != {0}
        running.control("threads", size=1)
        wait_for(lambda: running.control("threads")["size"] == 1, what="one I/O thread")
        wait_for(lambda: {c["thread"] for c in running.control("connections")["connections"]} == {0}, what="moved")
        for index, ws in enumerate(clients):
            ws.send(sip_over_ws(sip_request("OPTIONS", 2, call_id=f"after-{index}")).decode())
            assert parse_response(ws.recv(timeout=5)).all("call-id") == [f"after-{index}"]


def test_two_hundred_wss_upgrades_in_a_row_are_all_answered(start_transport: StartTransport) -> None:
    """Every WSS upgrade gets its 101, whichever I/O thread adopts the connection.

    With two threads on one TLS 1.3 connection the test client lost its upgrade request now and then
    (see ``threaded_client_tls_context`` in tests/wsclient.py): two hundred in a row caught it in 5 runs
    of 5, as a client timeout (and ``ws_handshake_failed.timeout`` here).
    """
    running = start_transport(workers=1, threads=2, **WEBSOCKETS)
    for _ in range(200):
        with ws_connect(running, True) as ws:
            assert ws.subprotocol == "sip"
    assert running.counters().get("ws_handshake_failed.timeout", 0) == 0


def test_proxy_reaches_a_registered_websocket_client_over_its_own_connection(start_transport: StartTransport) -> None:
    running = start_transport("--open-registrar", workers=2, router="proxy", **WEBSOCKETS)  # no users: a lab
    contact = "<sip:alice@df7jal23ls0d.invalid;transport=ws>"
    register = sip_request("REGISTER", 1, call_id="reg-ws", uri="sip:127.0.0.1", headers=[("Contact", contact)])
    register = register.replace(b"To: <sip:service@127.0.0.1>", b"To: <sip:alice@127.0.0.1>")
    with ws_connect(running, True) as alice, SipClient.connect(running) as bob:
        alice.send(sip_over_ws(register, "WSS").decode())
        assert parse_response(alice.recv(timeout=5)).status == 200
        bob.send(sip_request("MESSAGE", 1, call_id="msg-to-ws", uri="sip:alice@127.0.0.1", body=b"hello alice"))
        delivered = parse(str(alice.recv(timeout=5)).encode())
        assert (delivered.method, delivered.body) == ("MESSAGE", b"hello alice")
        vias = delivered.values("via")
        assert len(vias) == 2 and vias[1].startswith("SIP/2.0/TCP 127.0.0.1:5999")
        alice.send(build_response(delivered, 200, "OK").decode())
        answer = bob.read_response()
        assert (answer.status, answer.all("call-id")) == (200, ["msg-to-ws"])
        assert len(answer.all("via")) == 1
    counters = running.counters()
    assert counters.get("write.bad_destination", 0) == 0 and counters.get("router_errors", 0) == 0


@pytest.mark.parametrize("secure", [True, False], ids=["wss", "ws"])
def test_a_call_with_a_websocket_leg_names_ws_in_via_and_record_route(
    start_transport: StartTransport, secure: bool
) -> None:
    """RFC 7118 section 5.2: Via ``WS``/``WSS``, a Record-Route ``transport=ws`` (sips: for WSS) for the WebSocket leg,
    in the INVITE and in the in-dialog requests either way; the WebSocket binding goes with its connection."""
    running = start_transport("--open-registrar", workers=2, router="proxy", **WEBSOCKETS)
    name, ws_port = ("WSS", running.wss_port) if secure else ("WS", running.ws_port)
    contact = "<sip:alice@df7jal23ls0d.invalid;transport=ws>"
    register = sip_request("REGISTER", 1, call_id="reg-ws", uri="sip:127.0.0.1", headers=[("Contact", contact)])
    register = register.replace(b"To: <sip:service@127.0.0.1>", b"To: <sip:alice@127.0.0.1>")
    with ws_connect(running, secure) as alice, Phone(running, "bob@127.0.0.1") as bob:
        alice.send(sip_over_ws(register, name).decode())
        assert parse_response(alice.recv(timeout=5)).status == 200
        bob.send(
            bob.request("INVITE", "sip:alice@127.0.0.1", call_id="ws-call", headers=[("Contact", f"<{bob.contact}>")])
        )
        invite = parse(str(alice.recv(timeout=5)).encode())
        assert invite.values("via")[0].startswith(f"SIP/2.0/{name} 127.0.0.1:{ws_port};branch=z9hG4bKsw")
        record_routes = invite.values("record-route")
        scheme = "sips" if secure else "sip"
        assert record_routes[0].startswith(f"<{scheme}:127.0.0.1:{ws_port};transport=ws;lr;swr="), record_routes
        assert record_routes[1].startswith(f"<sip:127.0.0.1:{running.port};transport=tcp;lr;swr="), record_routes
        answer = build_response(
            invite, 200, "OK", to_tag="alice-tag",
            extra_headers=[*(("Record-Route", value) for value in record_routes), ("Contact", contact)],
        )  # fmt: skip
        alice.send(answer.decode())
        ok = bob.read()
        assert ok.status == 200 and ok.values("record-route") == record_routes
        to_alice = ok.header("to") or ""
        bob.send(
            bob.request("ACK", "sip:alice@df7jal23ls0d.invalid;transport=ws", call_id="ws-call", cseq=1, to=to_alice,
                        headers=[("Route", ", ".join(reversed(record_routes)))])
        )  # fmt: skip
        ack = parse(str(alice.recv(timeout=5)).encode())
        assert ack.method == "ACK" and ack.values("via")[0].startswith(f"SIP/2.0/{name} 127.0.0.1:{ws_port};")
        bye = sip_request("BYE", 1, call_id="ws-call", uri=bob.contact, headers=[("Route", ", ".join(record_routes))])
        bye = bye.replace(b";tag=from-tag-1", b";tag=alice-tag").replace(
            b"To: <sip:service@127.0.0.1>", b"To: <sip:bob@127.0.0.1>;tag=ft1"
        )
        alice.send(sip_over_ws(bye, name).decode())
        got_bye = bob.read()
        assert got_bye.method == "BYE"
        assert got_bye.values("via")[0].startswith(f"SIP/2.0/TCP 127.0.0.1:{running.port};branch=z9hG4bKsw")
        assert got_bye.values("via")[1].startswith(f"SIP/2.0/{name} df7jal23ls0d.invalid")
        bob.send(build_response(got_bye, 200, "OK"))
        assert parse_response(alice.recv(timeout=5)).status == 200
    bob_again = Phone(running, "bob@127.0.0.1")  # alice's WebSocket closed: her binding went with it
    with bob_again:
        wait_for(lambda: running.counters().get("registrar.flows_closed", 0) == 1, what="the WebSocket binding removed")
        bob_again.send(bob_again.request("MESSAGE", "sip:alice@127.0.0.1", call_id="too-late"))
        assert bob_again.read().reason == "Not Found (no binding and no upstream)"
    wait_for(lambda: running.counters().get("proxy.in_dialog") == 2, what="the ACK and the BYE counted")
    assert running.counters().get("router_errors", 0) == 0


def test_no_outbound_websocket_connections(start_transport: StartTransport) -> None:
    running = start_transport(workers=1, router="tests.routers_for_tests:send_and_report", **WEBSOCKETS)
    with SipClient.connect(running) as client:
        for transport in ("ws", "wss"):
            client.send(
                sip_request("OPTIONS", 1, call_id=f"to-{transport}",
                            headers=[("X-Target-Port", str(running.ws_port)), ("X-Target-Transport", transport)])
            )  # fmt: skip
            answer = client.read_response()
            assert (answer.status, answer.reason) == (200, "bad_destination")
            assert "no outbound WebSocket" in (answer.header("x-outcome-reason") or "")


def test_sigterm_closes_websockets_with_1001(start_transport: StartTransport) -> None:
    running = start_transport(workers=1, **WEBSOCKETS)
    with ws_connect(running, False) as ws:
        ws.send(sip_over_ws(sip_request("OPTIONS", 1)).decode())
        assert parse_response(ws.recv(timeout=5)).status == 200
        assert running.stop() == 0
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=5)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1001


def test_console_lists_filters_counts_and_exports_ws_and_wss(start_transport: StartTransport, tmp_path: Any) -> None:
    from tests.console_process import console_starter

    starter = console_starter(tmp_path)
    start_console = next(starter)
    try:
        running = start_transport(workers=1, **WEBSOCKETS)
        console = start_console(running)
        with ws_connect(running, False) as plain, ws_connect(running, True) as secure:
            for ws in (plain, secure):
                ws.send(sip_over_ws(sip_request("OPTIONS", 1)).decode())
                assert parse_response(ws.recv(timeout=5)).status == 200
            with console.client() as http:
                for proto in ("ws", "wss"):
                    listed = wait_for(
                        lambda p=proto: (
                            (r := http.get("/api/connections", params={"proto": p}).json())["total"] == 1 and r
                        ),
                        what=f"one {proto} connection in the console",
                    )
                    assert listed["connections"][0]["transport"] == proto
                assert http.get("/api/connections", params={"proto": "tcp"}).json()["total"] == 0
                wait_for(  # the histograms reach the stats block on the supervisor's next write
                    lambda: http.get("/api/stats").json()["ws_handshake_ms"]["count"] == 2,
                    what="both WebSocket handshakes in the histogram",
                )
                page = http.get("/connections", params={"proto": "wss"}).text
                assert 'value="wss" selected' in page
                metrics = wait_for(
                    lambda: (
                        'sipwire_connections_by_transport{transport="wss"} 1' in (t := http.get("/metrics").text) and t
                    ),
                    what="the WSS connection in /metrics",
                )
                assert 'sipwire_events_total{event="accepted.ws"} 1' in metrics
                assert "sipwire_ws_handshake_seconds_count 2" in metrics
                overview = wait_for(lambda: 'data-testid="connections-wss">1<' in (t := http.get("/").text) and t,
                                    what="WSS counted on the overview")  # fmt: skip
                assert 'data-testid="connections-ws">1<' in overview
                assert "WebSocket upgrades (2)" in overview and 'data-testid="ws-percentiles"' in overview
    finally:
        for _ in starter:
            pass


@pytest.mark.parametrize("command", ["run", "transport"])
def test_ws_and_wss_flags_on_run_and_transport(command: str) -> None:
    from sipwire.cli import _settings, build_parser

    settings = _settings(build_parser().parse_args([command, "--ws", "127.0.0.1:8088", "--wss", "[::1]:8089"]))
    assert (settings.ws_address, settings.wss_address) == (("127.0.0.1", 8088), ("::1", 8089))
    settings = _settings(build_parser().parse_args([command, "--tls", "", "--wss", ""]))
    assert settings.tls_address is None and settings.wss_address is None  # an empty address turns a listener off
