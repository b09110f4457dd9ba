"""The sans-IO WebSocket layer (transport/wsframing.py): upgrade, messages, control frames, limits, refusals.

The client side is wsproto in client mode or hand-made bytes (for what a
well-behaved client never sends); the transport's end-to-end behaviour over
real sockets, with an independent client library, is in test_websocket.py.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from sipwire.transport.framing import PING_EVENT
from sipwire.transport.wsframing import WebSocketClosedError, WsControl, WsFramer, WsLimits

LIMITS = WsLimits(max_message_bytes=4096, max_frame_bytes=1024)
OPTIONS = (
    b"OPTIONS sip:service@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/WS x.invalid;branch=z9hG4bK1\r\nContent-Length: 0\r\n\r\n"
)


def _upgrade(limits: WsLimits = LIMITS, **request: object) -> tuple[WsFramer, WSConnection, list[object]]:
    framer = WsFramer(limits)
    client = WSConnection(ConnectionType.CLIENT)
    fields: dict[str, object] = {"host": "127.0.0.1", "target": "/", "subprotocols": ["sip"], **request}
    events = framer.feed(client.send(Request(**fields)))  # type: ignore[arg-type]
    return framer, client, events


def _opened(limits: WsLimits = LIMITS) -> tuple[WsFramer, WSConnection]:
    framer, client, events = _upgrade(limits)
    [accept] = events
    assert isinstance(accept, WsControl) and accept.upgraded
    client.receive_data(accept.data)
    assert [type(e) for e in client.events()] == [AcceptConnection]
    return framer, client


def _masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame made by hand (for what wsproto's client refuses to produce)."""
    key = os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    header = bytes([first, 0x80 | length]) if length < 126 else bytes([first, 0x80 | 126]) + length.to_bytes(2, "big")
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _closed(framer: WsFramer, data: bytes) -> WebSocketClosedError:
    with pytest.raises(WebSocketClosedError) as caught:
        framer.feed(data)
    return caught.value


def _close_code(client: WSConnection, error: WebSocketClosedError) -> int:
    last = error.events[-1]
    assert isinstance(last, WsControl)
    client.receive_data(last.data)
    [close] = [e for e in client.events() if isinstance(e, CloseConnection)]
    return int(close.code)


def _refusal(error: WebSocketClosedError) -> tuple[int, bytes]:
    last = error.events[-1]
    assert isinstance(last, WsControl)
    client = WSConnection(ConnectionType.CLIENT)
    client.send(Request(host="127.0.0.1", target="/"))
    client.receive_data(last.data)
    events = list(client.events())
    assert isinstance(events[0], RejectConnection)
    body = b"".join(e.data for e in events if isinstance(e, RejectData))
    return events[0].status_code, body


# -- the upgrade ------------------------------------------------------------------------------------


def test_upgrade_with_sip_is_accepted_and_names_the_subprotocol() -> None:
    framer, client, events = _upgrade(extra_headers=[(b"Origin", b"https://phone.example")])
    [accept] = events
    assert isinstance(accept, WsControl) and accept.upgraded and accept.counter == "ws_handshakes"
    assert b"Sec-WebSocket-Protocol: sip\r\n" in accept.data
    assert b"Sec-WebSocket-Extensions" not in accept.data  # no permessage-deflate: no zlib state per connection
    client.receive_data(accept.data)
    [accepted] = list(client.events())
    assert isinstance(accepted, AcceptConnection) and accepted.subprotocol == "sip"
    assert framer.open and framer.origin == "https://phone.example"


def test_plain_http_request_is_refused_400_with_the_reason() -> None:
    framer = WsFramer(LIMITS)
    error = _closed(framer, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert error.counter == "ws_handshake_failed.not_upgrade"
    last = error.events[-1]
    assert isinstance(last, WsControl)
    assert last.data.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close\r\n" in last.data and last.data.endswith(b"Missing header, 'Connection: Upgrade'\n")
    assert not framer.open


@pytest.mark.parametrize(
    ("request_bytes", "counter"),
    [
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", "ws_handshake_failed.not_get"),
        (b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 0\r\n\r\n", "ws_handshake_failed.bad_http"),
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", "ws_handshake_failed.bad_http"),
    ],
)
def test_other_requests_are_refused_and_named(request_bytes: bytes, counter: str) -> None:
    error = _closed(WsFramer(LIMITS), request_bytes)
    assert error.counter == counter
    last = error.events[-1]
    assert isinstance(last, WsControl) and last.data.startswith(b"HTTP/1.1 4")


def test_upgrade_without_the_sip_subprotocol_is_refused() -> None:
    with pytest.raises(WebSocketClosedError) as caught:
        _upgrade(subprotocols=["chat"])
    assert caught.value.counter == "ws_handshake_failed.no_sip_subprotocol"
    assert _refusal(caught.value) == (400, b"the WebSocket subprotocol sip is required\n")


def test_origin_allow_list() -> None:
    limits = WsLimits(4096, 1024, frozenset({"https://phone.example"}))
    framer, _, _ = _upgrade(limits, extra_headers=[(b"Origin", b"https://phone.example")])
    assert framer.open
    framer, _, _ = _upgrade(limits)  # no Origin: not a browser, nothing to check
    assert framer.open
    with pytest.raises(WebSocketClosedError) as caught:
        _upgrade(limits, extra_headers=[(b"Origin", b"https://evil.example")])
    assert caught.value.counter == "ws_handshake_failed.origin"
    status, body = _refusal(caught.value)
    assert status == 403 and b"evil.example" in body


def test_wrong_websocket_version_is_answered_426() -> None:
    request = (
        b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n"
        b"Sec-WebSocket-Protocol: sip\r\n\r\n"
    )
    error = _closed(WsFramer(LIMITS), request)
    assert error.counter == "ws_handshake_failed.bad_version"
    last = error.events[-1]
    assert isinstance(last, WsControl) and last.data.startswith(b"HTTP/1.1 426 ")


def test_a_request_arriving_in_pieces_upgrades_once_whole() -> None:
    framer = WsFramer(LIMITS)
    request = WSConnection(ConnectionType.CLIENT).send(Request(host="h", target="/", subprotocols=["sip"]))
    for byte in request[:-1]:
        assert framer.feed(bytes([byte])) == []
    [accept] = framer.feed(request[-1:])
    assert isinstance(accept, WsControl) and accept.upgraded


# -- messages -----------------------------------------------------------------------------------------


def test_text_and_binary_messages_are_sip_messages() -> None:
    framer, client = _opened()
    data = client.send(TextMessage(data=OPTIONS.decode())) + client.send(BytesMessage(data=OPTIONS))
    assert framer.feed(data) == [OPTIONS, OPTIONS]


def test_fragmented_message_is_reassembled_across_reads() -> None:
    framer, client = _opened()
    parts = [OPTIONS[:10], OPTIONS[10:40], OPTIONS[40:]]
    data = b"".join(
        client.send(TextMessage(data=part.decode(), message_finished=index == len(parts) - 1))
        for index, part in enumerate(parts)
    )
    events: list[object] = []
    for index in range(0, len(data), 7):
        events += framer.feed(data[index : index + 7])
        assert framer.in_message or index + 7 >= len(data) or events
    assert events == [OPTIONS]
    assert not framer.in_message and framer.buffered_bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40))
def test_any_split_of_the_stream_gives_the_same_messages(cuts: list[int]) -> None:
    framer, client = _opened()
    data = b"".join(client.send(TextMessage(data=OPTIONS.decode())) for _ in range(3)) + client.send(Ping(b"p"))
    events: list[object] = []
    position = 0
    for cut in cuts:
        events += framer.feed(data[position : position + cut])
        position += cut
    events += framer.feed(data[position:])
    messages = [e for e in events if isinstance(e, bytes)]
    assert messages == [OPTIONS] * 3
    assert [e.counter for e in events if isinstance(e, WsControl)] == ["ws_pings"]


def test_crlf_keepalive_message_is_a_ping_and_a_lone_crlf_is_skipped() -> None:
    framer, client = _opened()
    data = client.send(TextMessage(data="\r\n\r\n")) + client.send(TextMessage(data="\r\n"))
    assert framer.feed(data) == [PING_EVENT]


def test_ping_is_answered_with_a_pong_and_our_ping_waits_for_one() -> None:
    framer, client = _opened()
    [pong] = framer.feed(client.send(Ping(b"are you there")))
    assert isinstance(pong, WsControl) and pong.counter == "ws_pings"
    client.receive_data(pong.data)
    assert list(client.events()) == [Pong(payload=b"are you there")]
    client.receive_data(framer.ping())
    assert framer.awaiting_pong
    [ping] = list(client.events())
    assert isinstance(ping, Ping)
    assert framer.feed(client.send(ping.response())) == []
    assert not framer.awaiting_pong


def test_frame_wraps_utf8_as_text_and_other_bytes_as_binary() -> None:
    framer, client = _opened()
    client.receive_data(framer.frame(OPTIONS) + framer.frame(b"SIP/2.0 200 OK\r\nX: \xff\r\n\r\n"))
    events = list(client.events())
    assert isinstance(events[0], TextMessage) and events[0].data == OPTIONS.decode()
    assert isinstance(events[1], BytesMessage) and events[1].data == b"SIP/2.0 200 OK\r\nX: \xff\r\n\r\n"


def test_frame_is_empty_before_the_upgrade_and_after_the_close() -> None:
    framer = WsFramer(LIMITS)
    assert framer.frame(OPTIONS) == b"" and framer.ping() == b""
    framer, _ = _opened()
    assert framer.close(1000, "bye")
    assert framer.frame(OPTIONS) == b""


# -- the close handshake and bad frames ----------------------------------------------------------------


def test_peer_close_is_answered_and_reported_as_orderly() -> None:
    framer, client = _opened()
    data = client.send(TextMessage(data=OPTIONS.decode())) + client.send(CloseConnection(code=1000, reason="bye"))
    error = _closed(framer, data)
    assert error.peer_closed and error.counter == "ws_peer_close.1000"
    assert error.events[0] == OPTIONS  # what came before the close is still delivered
    assert _close_code(client, error) == 1000


def test_peer_answer_to_our_close_ends_quietly() -> None:
    framer, client = _opened()
    client.receive_data(framer.close(1001, "going away"))
    [close] = list(client.events())
    assert isinstance(close, CloseConnection)
    error = _closed(framer, client.send(close.response()))
    assert error.peer_closed and error.counter == "ws_peer_close.1001" and error.events == []


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x81\x02hi", 1002),  # unmasked: a client must mask (RFC 6455 section 5.1)
        (_masked(0x3, b"x"), 1002),  # reserved opcode
        (_masked(0x9, b"p", fin=False), 1002),  # fragmented control frame
        (_masked(0x1, b"\xff\xfe"), 1007),  # text that is not UTF-8
        (_masked(0x0, b"orphan"), 1002),  # continuation with nothing to continue
    ],
)
def test_bad_frames_close_with_the_right_code(frame: bytes, code: int) -> None:
    framer, client = _opened()
    error = _closed(framer, frame)
    assert not error.peer_closed and error.counter == f"ws_close.{code}"
    assert _close_code(client, error) == code


def test_frame_and_message_size_limits_close_with_1009() -> None:
    framer, client = _opened()
    error = _closed(framer, client.send(TextMessage(data="x" * 1025)))
    assert (error.counter, _close_code(client, error)) == ("ws_close.1009", 1009)
    framer, client = _opened()
    fragments = b"".join(client.send(TextMessage(data="x" * 1000, message_finished=False)) for _ in range(4))
    assert framer.feed(fragments) == []
    assert framer.in_message and framer.buffered_bytes == 4000
    error = _closed(framer, client.send(TextMessage(data="x" * 100)))
    assert (error.counter, _close_code(client, error)) == ("ws_close.1009", 1009)


def test_a_frame_too_large_is_refused_as_it_streams_in() -> None:
    """The declared length is not buffered first: 1025 bytes arriving 100 at a time are refused at once."""
    framer, client = _opened()
    frame = client.send(TextMessage(data="y" * 1025))
    events: list[object] = []
    with pytest.raises(WebSocketClosedError) as caught:
        for index in range(0, len(frame), 100):
            events += framer.feed(frame[index : index + 100])
    assert caught.value.counter == "ws_close.1009" and events == []
