"""Call flows over real processes: a real sipp call through the responder, read back through the console.

``GET /api/calls`` finds it by its Call-ID (which holds '/' and '@'), by user,
method and status; ``GET /api/calls/{call_id}`` lists INVITE, 200, ACK, BYE,
200 in carried order; the ``.pcap`` export is dissected by the real tshark
(Debian package ``tshark``). Invalid filters get 422 with the reason, an
unknown Call-ID 404, and a transport with the capture off answers 503 saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import RunningTransport, sip_request
from tests.console_process import RunningConsole, console_starter
from tests.sipp import SIPP, run_sipp
from tests.tshark import dissect, require_tshark
from tests.wsclient import parse_response, sip_over_ws, ws_connect

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.skipif(SIPP is None, reason="sipp is not on PATH (install the Debian package sip-tester)"),
]

#: sipp's -cid_str: a Call-ID with the characters routes must survive ('/' and '@').
CALL_ID_FORMAT = "flow/%u@calls.test"
CALL_ID = "flow/1@calls.test"
LADDER = [("in", "INVITE"), ("out", 200), ("in", "ACK"), ("in", "BYE"), ("out", 200)]


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[Callable[..., RunningConsole]]:
    yield from console_starter(tmp_path)


@pytest.fixture
def called(start_transport, start_console, tmp_path: Path) -> tuple[RunningTransport, RunningConsole]:
    """A responder transport that carried one sipp INVITE/ACK/BYE call, and a console on it."""
    transport = start_transport(workers=1)
    result = run_sipp(
        transport.host, transport.port, tmp_path / "uac", scenario="uac", transport="t1", calls=1, rate=1,
        timeout=20, extra_args=["-cid_str", CALL_ID_FORMAT, "-s", "bob"],
    )  # fmt: skip
    assert (result.returncode, result.successful, result.failed) == (0, 1, 0), result.describe()
    return transport, start_console(transport)


def _kinds(messages: list[dict]) -> list[tuple[str, str | int]]:
    return [(m["direction"], m.get("method") or m["status"]) for m in messages]


def test_the_call_is_listed_found_by_each_filter_and_laddered_in_order(
    called: tuple[RunningTransport, RunningConsole],
) -> None:
    transport, console = called
    with console.client() as http:
        listed = http.get("/api/calls").json()
        [call] = listed["calls"]
        assert call["call_id"] == CALL_ID and call["first_method"] == "INVITE" and call["messages"] == 5
        assert call["to_user"] == "bob" and call["from_user"] == "sipp" and call["last_status"] == 200
        assert listed["capture"]["messages"] == 5 and listed["capture"]["evicted"] == 0
        for query, hits in (
            ({"call_id": "flow/1@"}, 1), ({"call_id": "nope"}, 0), ({"to_user": "BO"}, 1), ({"from_user": "bob"}, 0),
            ({"method": "bye"}, 1), ({"method": "CANCEL"}, 0), ({"status": "200"}, 1), ({"status": "486"}, 0),
            ({"last": 600}, 1), ({"since": call["last"] + 1}, 0), ({"until": call["started"] - 1}, 0),
        ):  # fmt: skip
            answer = http.get("/api/calls", params=query).json()
            assert (answer["total"], len(answer["calls"])) == (hits, hits), query
        past_the_end = http.get("/api/calls", params={"offset": 1}).json()
        assert (past_the_end["total"], past_the_end["calls"]) == (1, [])
        for path in (f"/api/calls/{CALL_ID}", f"/api/calls/{quote(CALL_ID, safe='')}"):
            detail = http.get(path).json()
            assert detail["call_id"] == CALL_ID and _kinds(detail["messages"]) == LADDER, path
        assert [m["seq"] for m in detail["messages"]] == sorted(m["seq"] for m in detail["messages"])
        times = [m["time"] for m in detail["messages"]]
        assert times == sorted(times) and call["started"] == times[0]
        assert detail["messages"][0]["text"].startswith("INVITE sip:bob@")
        assert detail["messages"][0]["remote"].startswith("127.0.0.1:")
        assert detail["messages"][0]["local"] == f"{transport.host}:{transport.port}"
        # sipp's INVITE carries SDP; capture_bodies is off by default, so only its size is told.
        assert detail["messages"][0]["body_withheld"] is True and "v=0" not in detail["messages"][0]["text"]
        pcap = http.get(f"/api/calls/{CALL_ID}.pcap")
    assert pcap.status_code == 200 and pcap.headers["content-type"] == "application/vnd.tcpdump.pcap"
    assert 'filename="call-flow_1_calls.test.pcap"' in pcap.headers["content-disposition"]
    require_tshark()  # the API part passed; a skip without tshark, a failure in CI
    rows = dissect(pcap.content, transport.port)
    assert [(row.method or row.status) for row in rows] == [kind for _, kind in LADDER]
    assert {row.call_id for row in rows} == {CALL_ID}


def test_invalid_filters_get_422_with_the_reason_and_an_unknown_call_404(
    called: tuple[RunningTransport, RunningConsole],
) -> None:
    _, console = called
    with console.client() as http:
        for query, field in (
            ({"status": "99"}, "status"), ({"status": "abc"}, "status"), ({"method": "IN VITE"}, "method"),
            ({"limit": 0}, "limit"), ({"limit": 201}, "limit"), ({"offset": -1}, "offset"),
            ({"since": "yesterday"}, "since"), ({"since": "inf"}, "since"), ({"last": -5}, "last"),
            ({"call_id": "x" * 257}, "call_id"),
        ):  # fmt: skip
            answer = http.get("/api/calls", params=query)
            assert answer.status_code == 422, (query, answer.text)
            assert any(field in error["loc"] for error in answer.json()["detail"]), answer.text
        for path in ("/api/calls/no-such-call@x", "/api/calls/no/such/call.pcap"):
            answer = http.get(path)
            assert answer.status_code == 404 and "no captured call" in answer.json()["detail"], answer.text
        assert http.get(f"/api/calls/{'y' * 257}").status_code == 422
        page = http.get("/calls/no-such-call@x")
        assert page.status_code == 404 and "holds no message with this Call-ID" in page.text


def test_with_the_capture_off_the_transport_says_so(start_transport, start_console) -> None:
    transport = start_transport(env={"SIPWIRE_CAPTURE": "false"})
    console = start_console(transport)
    with console.client() as http:
        for path in ("/api/calls", "/api/calls/anything"):
            answer = http.get(path)
            assert answer.status_code == 503 and "capture is off" in answer.json()["detail"], answer.text


def test_reads_follow_the_console_read_rules_beyond_loopback(called, start_console) -> None:
    """Captured SIP is user data: a console listening beyond loopback wants the token for it, as for any read."""
    transport, _ = called
    console = start_console(transport, extra_args=("--listen", "0.0.0.0:0"))
    with console.client() as http:
        for path in ("/api/calls", f"/api/calls/{CALL_ID}", f"/api/calls/{CALL_ID}.pcap"):
            assert http.get(path).status_code == 401, path
            answer = http.get(path, headers={"Authorization": f"Bearer {console.token}"})
            assert answer.status_code == 200, path


def test_over_a_websocket_the_capture_keeps_the_sip_text_not_the_frames(start_transport, start_console) -> None:
    """WS: what is captured, and exported, is the SIP message each WebSocket message carried."""
    transport = start_transport(ws="127.0.0.1:0")
    with ws_connect(transport, secure=False) as ws:
        ws.send(sip_over_ws(sip_request("OPTIONS", 1, call_id="over-ws@calls.test")))
        assert parse_response(ws.recv(timeout=5)).status == 200
    console = start_console(transport)
    with console.client() as http:
        detail = http.get("/api/calls/over-ws@calls.test").json()
        pcap = http.get("/api/calls/over-ws@calls.test.pcap").content
    assert [(m["direction"], m["transport"]) for m in detail["messages"]] == [("in", "ws"), ("out", "ws")]
    assert detail["messages"][0]["text"].startswith("OPTIONS sip:")
    assert detail["messages"][1]["text"].startswith("SIP/2.0 200 ")
    require_tshark()
    rows = dissect(pcap, transport.ws_port)
    assert [(row.method or row.status, row.call_id) for row in rows] == [
        ("OPTIONS", "over-ws@calls.test"), (200, "over-ws@calls.test"),
    ]  # fmt: skip
