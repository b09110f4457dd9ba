"""Sans-IO framer: test vectors fed whole, byte by byte and pipelined; errors; properties."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipwire.transport.framing import (
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    PING_EVENT,
    PONG,
    Event,
    Framer,
    FramerLimits,
    FramingError,
    FramingErrorReason,
    Ping,
    content_length,
)
from sipwire.transport.sip import SipParseError, parse
from sipwire.transport.sipresponse import response_for_unparsable

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)

MANDATORY = (
    "Via: SIP/2.0/TCP client.example.com:5060;branch=z9hG4bK74bf9\r\n"
    "From: Alice <sip:alice@example.com>;tag=9fxced76sl\r\n"
    "To: Bob <sip:bob@example.com>\r\n"
    "Call-ID: 3848276298220188511@example.com\r\n"
)


def request(content_length_line: str = "Content-Length: 0", body: bytes = b"", method: str = "OPTIONS") -> bytes:
    """A request whose Content-Length line is given verbatim."""
    head = f"{method} sip:bob@example.com SIP/2.0\r\n{MANDATORY}CSeq: 1 {method}\r\n{content_length_line}\r\n\r\n"
    return head.encode() + body


def feed_whole(data: bytes, framer: Framer | None = None) -> list[Event]:
    return (framer or Framer()).feed(data)


def feed_bytewise(data: bytes, framer: Framer | None = None) -> list[Event]:
    framer = framer or Framer()
    events: list[Event] = []
    for i in range(len(data)):
        events += framer.feed(data[i : i + 1])
    return events


def feed_chunks(chunks: list[bytes], framer: Framer | None = None) -> list[Event]:
    framer = framer or Framer()
    events: list[Event] = []
    for chunk in chunks:
        events += framer.feed(chunk)
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates allowed)."""
    points = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


NEXT = request(method="BYE")

# (id, message bytes): each must frame as exactly itself.
VALID_VECTORS: list[tuple[str, bytes]] = [
    ("zero_length", request()),
    ("lowercase_name", request("content-length: 0")),
    ("uppercase_name", request("CONTENT-LENGTH: 0")),
    ("no_space", request("Content-Length:0")),
    ("space_before_colon", request("Content-Length : 0")),
    ("tabs_and_spaces", request("Content-Length \t:\t 4 \t", b"ping")),
    ("compact_l", request("l: 5", b"hello")),
    ("compact_upper_L", request("L:5", b"hello")),
    ("compact_l_spaces", request("l  :  5  ", b"hello")),
    ("body_with_crlfcrlf", request("Content-Length: 12", b"ab\r\n\r\ncd\r\n\r\n")),
    ("body_mentions_content_length", request("Content-Length: 19", b"\r\nContent-Length: 9")),
    ("body_starts_with_crlf", request("Content-Length: 4", b"\r\n\r\n")),
    ("leading_zeros", request("Content-Length: 007", b"1234567")),
    ("binary_body", request("Content-Length: 256", bytes(range(256)))),
    ("response", b"SIP/2.0 200 OK\r\nl: 3\r\n\r\nabc"),
    ("not_sip_at_all", b"hello\r\nl: 2\r\n\r\nhi"),
    (
        "sdp_body",
        request(
            "Content-Type: application/sdp\r\nContent-Length: 56",
            b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\n",
            method="INVITE",
        ),
    ),
    ("content_length_not_last", request("Content-Length: 3\r\nSubject: after length", b"xyz")),
]


def test_vectors_are_what_they_claim() -> None:
    for name, message in VALID_VECTORS:
        header_end = message.index(b"\r\n\r\n") + 4
        assert content_length(message[:header_end]) == len(message) - header_end, name


@pytest.mark.parametrize(("name", "message"), VALID_VECTORS, ids=[v[0] for v in VALID_VECTORS])
class TestValidVectors:
    def test_whole(self, name: str, message: bytes) -> None:
        framer = Framer()
        assert framer.feed(message) == [message]
        assert framer.buffered_bytes == 0
        assert not framer.in_message

    def test_byte_by_byte(self, name: str, message: bytes) -> None:
        framer = Framer()
        assert feed_bytewise(message[:-1], framer) == []
        assert framer.in_message
        assert framer.buffered_bytes == len(message) - 1
        assert framer.feed(message[-1:]) == [message]
        assert framer.buffered_bytes == 0
        assert not framer.in_message

    def test_pipelined_with_next(self, name: str, message: bytes) -> None:
        stream = message + NEXT + message
        expected = [message, NEXT, message]
        assert feed_whole(stream) == expected
        assert feed_bytewise(stream) == expected

    def test_pipelined_with_partial_next(self, name: str, message: bytes) -> None:
        framer = Framer()
        assert framer.feed(message + NEXT[:10]) == [message]
        assert framer.in_message
        assert framer.buffered_bytes == 10
        assert framer.feed(NEXT[10:]) == [NEXT]
        assert framer.buffered_bytes == 0

    def test_every_two_way_split(self, name: str, message: bytes) -> None:
        stream = message + NEXT
        for cut in range(len(stream) + 1):
            assert feed_chunks([stream[:cut], stream[cut:]]) == [message, NEXT], cut


def test_empty_feed_returns_nothing() -> None:
    framer = Framer()
    assert framer.feed(b"") == []
    assert framer.buffered_bytes == 0
    assert not framer.in_message


def test_body_waits_for_its_last_byte() -> None:
    message = request("Content-Length: 10", b"0123456789")
    header_length = len(message) - 10
    framer = Framer()
    assert framer.feed(message[:header_length]) == []
    assert framer.in_message
    assert framer.buffered_bytes == header_length
    assert framer.feed(b"012345678") == []
    assert framer.buffered_bytes == header_length + 9
    assert framer.feed(b"9") == [message]
    assert framer.buffered_bytes == 0


def test_many_reads_of_uneven_sizes() -> None:
    messages = [request(f"Content-Length: {n}", b"x" * n) for n in (0, 1, 100, 1500, 7)]
    stream = b"".join(messages)
    chunks = [stream[i : i + size] for i, size in _uneven_offsets(len(stream))]
    assert b"".join(chunks) == stream
    assert feed_chunks(chunks) == messages


def _uneven_offsets(total: int) -> list[tuple[int, int]]:
    offsets: list[tuple[int, int]] = []
    position = 0
    size = 1
    while position < total:
        offsets.append((position, size))
        position += size
        size = size * 3 % 97 + 1
    return offsets


# -- keep-alives (RFC 5626 section 4.4.1) ---------------------------------------------------------


def test_ping_between_messages() -> None:
    first = request()
    stream = first + b"\r\n\r\n" + NEXT
    expected: list[Event] = [first, PING_EVENT, NEXT]
    assert feed_whole(stream) == expected
    assert feed_bytewise(stream) == expected


def test_ping_event_is_the_singleton_ping() -> None:
    (event,) = Framer().feed(b"\r\n\r\n")
    assert isinstance(event, Ping)
    assert event is PING_EVENT
    assert PONG == b"\r\n"


def test_ping_alone_leaves_nothing_buffered() -> None:
    framer = Framer()
    assert framer.feed(b"\r\n\r\n") == [PING_EVENT]
    assert framer.buffered_bytes == 0
    assert not framer.in_message


def test_two_pings_in_one_read() -> None:
    assert Framer().feed(b"\r\n\r\n\r\n\r\n") == [PING_EVENT, PING_EVENT]


def test_ping_split_across_reads() -> None:
    framer = Framer()
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"\r") == []
    assert framer.buffered_bytes == 3
    assert not framer.in_message
    assert framer.feed(b"\n") == [PING_EVENT]
    assert framer.buffered_bytes == 0


def test_lone_crlf_pong_is_skipped() -> None:
    framer = Framer()
    message = request()
    assert framer.feed(b"\r\n" + message) == [message]
    assert framer.buffered_bytes == 0


def test_pong_after_message_is_skipped() -> None:
    message = request()
    assert feed_whole(message + b"\r\n" + NEXT) == [message, NEXT]
    assert feed_bytewise(message + b"\r\n" + NEXT) == [message, NEXT]


def test_partial_crlf_at_boundary_waits_for_more() -> None:
    framer = Framer()
    message = request()
    assert framer.feed(message + b"\r\n") == [message]
    # Two bytes that may still become a ping: held, but not a message in progress.
    assert framer.buffered_bytes == 2
    assert not framer.in_message
    assert framer.feed(NEXT) == [NEXT]
    assert framer.buffered_bytes == 0


def test_lone_cr_waits_then_is_skipped() -> None:
    framer = Framer()
    assert framer.feed(b"\r") == []
    assert framer.buffered_bytes == 1
    assert not framer.in_message
    assert framer.feed(NEXT) == [NEXT]


def test_leading_crlfs_before_first_message() -> None:
    # Three CRLFs: one ping, then a pong/padding skipped before the message.
    assert feed_whole(b"\r\n\r\n\r\n" + NEXT) == [PING_EVENT, NEXT]
    assert feed_bytewise(b"\r\n\r\n\r\n" + NEXT) == [PING_EVENT, NEXT]


def test_bare_lf_padding_is_skipped() -> None:
    assert feed_whole(b"\n\n" + NEXT) == [NEXT]
    assert feed_whole(b"\r\r\n" + NEXT) == [NEXT]


def test_crlf_cr_followed_by_a_message_does_not_stall() -> None:
    # Regression: "\r\n\r" followed by anything but "\n" used to be held forever
    # (buffer growing without limit), because only its first 3 bytes were checked.
    framer = Framer()
    assert framer.feed(b"\r\n\r" + NEXT) == [NEXT]
    assert framer.buffered_bytes == 0
    framer = Framer()
    assert framer.feed(b"\r\n\r") == []
    assert framer.feed(NEXT) == [NEXT]


def test_in_message_states() -> None:
    framer = Framer()
    assert framer.feed(b"\r\n") == []
    assert not framer.in_message
    assert framer.feed(NEXT[:1]) == []
    assert framer.in_message
    assert framer.buffered_bytes == 1
    rest = NEXT[1:]
    assert framer.feed(rest) == [NEXT]
    assert not framer.in_message
    assert framer.buffered_bytes == 0


# -- framing errors --------------------------------------------------------------------------------

ERROR_VECTORS: list[tuple[str, bytes, FramingErrorReason]] = [
    ("missing", request("Subject: none"), FramingErrorReason.MISSING_CONTENT_LENGTH),
    ("only_in_body", request("X-Len: 0", b"\r\nContent-Length: 0\r\n\r\n"), FramingErrorReason.MISSING_CONTENT_LENGTH),
    ("folded_name_not_a_header", request("Subject: x\r\n l: 0"), FramingErrorReason.MISSING_CONTENT_LENGTH),
    ("similar_name", request("Content-Lengths: 0"), FramingErrorReason.MISSING_CONTENT_LENGTH),
    ("negative", request("Content-Length: -1"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("plus_sign", request("Content-Length: +1"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("letters", request("Content-Length: ten"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("trailing_garbage", request("l: 5x"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("inner_space", request("Content-Length: 1 0"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("decimal", request("Content-Length: 1.5"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("hex", request("Content-Length: 0x10"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("empty", request("Content-Length:"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("blank", request("Content-Length:   "), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("ten_digits", request("Content-Length: 0000000001"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("arabic_digit", request("Content-Length: \u0661"), FramingErrorReason.BAD_CONTENT_LENGTH),
    ("duplicate_same", request("Content-Length: 0\r\nContent-Length: 0"), FramingErrorReason.DUPLICATE_CONTENT_LENGTH),
    ("duplicate_compact", request("l: 0\r\nContent-Length: 0"), FramingErrorReason.DUPLICATE_CONTENT_LENGTH),
    ("duplicate_different", request("l: 0\r\nL: 4"), FramingErrorReason.DUPLICATE_CONTENT_LENGTH),
    ("too_large", request("Content-Length: 70000"), FramingErrorReason.MESSAGE_TOO_LARGE),
    ("too_large_nine_digits", request("Content-Length: 999999999"), FramingErrorReason.MESSAGE_TOO_LARGE),
]


@pytest.mark.parametrize(("name", "message", "reason"), ERROR_VECTORS, ids=[v[0] for v in ERROR_VECTORS])
class TestErrorVectors:
    def test_whole(self, name: str, message: bytes, reason: FramingErrorReason) -> None:
        with pytest.raises(FramingError) as caught:
            Framer().feed(message)
        assert caught.value.reason is reason
        assert caught.value.header_block == message[: message.index(b"\r\n\r\n") + 4]
        assert str(caught.value).startswith(f"{reason.value}: ")

    def test_byte_by_byte_raises_on_last_header_byte(
        self, name: str, message: bytes, reason: FramingErrorReason
    ) -> None:
        framer = Framer()
        header_end = message.index(b"\r\n\r\n") + 4
        assert feed_bytewise(message[: header_end - 1], framer) == []
        with pytest.raises(FramingError) as caught:
            framer.feed(message[header_end - 1 : header_end])
        assert caught.value.reason is reason

    def test_after_a_good_message(self, name: str, message: bytes, reason: FramingErrorReason) -> None:
        framer = Framer()
        assert framer.feed(NEXT) == [NEXT]
        with pytest.raises(FramingError) as caught:
            framer.feed(message)
        assert caught.value.reason is reason
        assert caught.value.header_block.startswith(b"OPTIONS sip:bob@example.com SIP/2.0\r\n")


def test_error_detail_names_the_offending_value() -> None:
    with pytest.raises(FramingError) as caught:
        Framer().feed(request("Content-Length: -12"))
    assert caught.value.detail == "Content-Length b'-12' is not a non-negative integer"
    with pytest.raises(FramingError) as caught:
        Framer().feed(request("l: 1\r\nContent-Length: 2"))
    assert caught.value.detail == "2 Content-Length headers: b'1, 2'"


def test_message_size_limit_boundary() -> None:
    limits = FramerLimits(max_message_bytes=300)
    header = request("Content-Length: 000")
    body_room = 300 - len(header)
    exact = request(f"Content-Length: {body_room:03d}", b"b" * body_room)
    assert len(exact) == 300
    assert Framer(limits).feed(exact) == [exact]
    over = request(f"Content-Length: {body_room + 1:03d}")
    with pytest.raises(FramingError) as caught:
        Framer(limits).feed(over)
    assert caught.value.reason is FramingErrorReason.MESSAGE_TOO_LARGE
    assert caught.value.detail == "message of 301 bytes exceeds 300"
    assert caught.value.header_block == over


def test_message_too_large_raised_before_the_body_arrives() -> None:
    framer = Framer(FramerLimits(max_message_bytes=1000))
    with pytest.raises(FramingError) as caught:
        framer.feed(request("Content-Length: 900"))
    assert caught.value.reason is FramingErrorReason.MESSAGE_TOO_LARGE


def test_header_limit_boundary_with_crlfcrlf() -> None:
    message = request()
    size = len(message)
    assert Framer(FramerLimits(max_header_bytes=size)).feed(message) == [message]
    with pytest.raises(FramingError) as caught:
        Framer(FramerLimits(max_header_bytes=size - 1)).feed(message)
    assert caught.value.reason is FramingErrorReason.HEADERS_TOO_LARGE
    assert caught.value.detail == f"header block of {size} bytes exceeds {size - 1}"
    assert caught.value.header_block == message


def test_header_limit_byte_by_byte_raises_at_the_first_byte_over() -> None:
    message = request()
    limit = 100
    framer = Framer(FramerLimits(max_header_bytes=limit))
    assert feed_bytewise(message[:limit], framer) == []
    assert framer.buffered_bytes == limit
    with pytest.raises(FramingError) as caught:
        framer.feed(message[limit : limit + 1])
    assert caught.value.reason is FramingErrorReason.HEADERS_TOO_LARGE
    assert caught.value.detail == f"no end of headers within {limit} bytes"
    # The complete lines read so far, for a best-effort answer.
    complete_lines = message[: message.rfind(b"\r\n", 0, limit + 1) + 2]
    assert caught.value.header_block == complete_lines
    assert caught.value.header_block.endswith(b"\r\n")


def test_header_limit_without_crlfcrlf_keeps_whole_lines() -> None:
    lines = b"OPTIONS sip:a@example.com SIP/2.0\r\n" + b"X-Pad: " + b"p" * 200 + b"\r\nX-Cut: abc"
    with pytest.raises(FramingError) as caught:
        Framer(FramerLimits(max_header_bytes=64)).feed(lines)
    assert caught.value.reason is FramingErrorReason.HEADERS_TOO_LARGE
    assert caught.value.header_block == lines[: lines.rindex(b"\r\n") + 2]


def test_header_limit_without_any_crlf_has_empty_header_block() -> None:
    # Regression: a header block with no line end at all used to come back as its first byte.
    with pytest.raises(FramingError) as caught:
        Framer(FramerLimits(max_header_bytes=16)).feed(b"A" * 17)
    assert caught.value.reason is FramingErrorReason.HEADERS_TOO_LARGE
    assert caught.value.header_block == b""


def test_default_header_limit() -> None:
    framer = Framer()
    assert framer.feed(b"OPTIONS sip:a SIP/2.0\r\n" + b"X" * (DEFAULT_MAX_HEADER_BYTES - 23)) == []
    assert framer.buffered_bytes == DEFAULT_MAX_HEADER_BYTES
    with pytest.raises(FramingError) as caught:
        framer.feed(b"X")
    assert caught.value.reason is FramingErrorReason.HEADERS_TOO_LARGE


def test_default_limits() -> None:
    assert FramerLimits() == FramerLimits(max_message_bytes=65536, max_header_bytes=16384)
    assert DEFAULT_MAX_MESSAGE_BYTES == 65536


@pytest.mark.parametrize(
    ("content_length_line", "status"),
    [
        ("Content-Length: x", 400),
        ("l: -3", 400),
        ("l: 1\r\nl: 1", 400),
        ("Content-Length: 99999", 413),
    ],
)
def test_header_block_answers_the_request(content_length_line: str, status: int) -> None:
    """What the transport does with a framing error: answer from ``header_block``."""
    with pytest.raises(FramingError) as caught:
        Framer().feed(request(content_length_line, method="INVITE") + b"body bytes")
    answer = response_for_unparsable(caught.value.header_block, status, "Bad")
    assert answer is not None
    response = parse(answer)
    assert response.status == status
    assert response.header("via") == "SIP/2.0/TCP client.example.com:5060;branch=z9hG4bK74bf9"
    assert response.header("from") == "Alice <sip:alice@example.com>;tag=9fxced76sl"
    assert response.header("call-id") == "3848276298220188511@example.com"
    assert response.header("cseq") == "1 INVITE"
    assert (response.header("to") or "").startswith("Bob <sip:bob@example.com>;tag=")
    assert response.header("content-length") == "0"
    assert response.body == b""


def test_missing_content_length_header_block_answers() -> None:
    with pytest.raises(FramingError) as caught:
        Framer().feed(request("Subject: no length"))
    answer = response_for_unparsable(caught.value.header_block, 400, "Bad Request")
    assert answer is not None
    assert answer.startswith(b"SIP/2.0 400 Bad Request\r\nVia: SIP/2.0/TCP client.example.com:5060;")


def test_error_from_a_response_gets_no_answer() -> None:
    with pytest.raises(FramingError) as caught:
        Framer().feed(b"SIP/2.0 200 OK\r\n" + MANDATORY.encode() + b"CSeq: 1 BYE\r\n\r\n")
    assert caught.value.reason is FramingErrorReason.MISSING_CONTENT_LENGTH
    assert response_for_unparsable(caught.value.header_block, 400, "Bad Request") is None


def test_content_length_function() -> None:
    assert content_length(b"X sip:a SIP/2.0\r\nl:\t 12 \t\r\n\r\n") == 12
    assert content_length(b"X sip:a SIP/2.0\r\ncOnTeNt-LeNgTh: 0\r\n\r\n") == 0
    assert content_length(b"X sip:a SIP/2.0\r\nContent-Length: 999999999\r\n\r\n") == 999_999_999
    with pytest.raises(FramingError) as caught:
        # Start line is not a header, even if it looks like one.
        content_length(b"l: 3\r\n\r\n")
    assert caught.value.reason is FramingErrorReason.MISSING_CONTENT_LENGTH


def test_framing_error_fields() -> None:
    error = FramingError(FramingErrorReason.MESSAGE_TIMEOUT, "took 5s", b"abc")
    assert str(error) == "message_timeout: took 5s"
    assert error.reason is FramingErrorReason.MESSAGE_TIMEOUT
    assert error.header_block == b"abc"
    assert FramingError(FramingErrorReason.MESSAGE_TIMEOUT, "x").header_block == b""
    assert {reason.value for reason in FramingErrorReason} == {
        "missing_content_length",
        "bad_content_length",
        "duplicate_content_length",
        "headers_too_large",
        "message_too_large",
        "message_timeout",
    }


# -- properties ------------------------------------------------------------------------------------

SMALL_LIMITS = FramerLimits(max_message_bytes=400, max_header_bytes=200)

_FRAGMENTS = st.sampled_from(
    [
        b"\r\n",
        b"\r",
        b"\n",
        b"\r\n\r\n",
        b"INVITE sip:a@b SIP/2.0\r\n",
        b"SIP/2.0 200 OK\r\n",
        b"Content-Length: ",
        b"l:",
        b"L : ",
        b" ",
        b"\t",
        b"0",
        b"7",
        b"12",
        b"-1",
        b"x",
        b"Via: SIP/2.0/TCP h\r\n",
        b"\xff\x00",
    ]
)
_SIP_ISH = st.lists(st.one_of(_FRAGMENTS, st.binary(max_size=8)), max_size=40).map(b"".join)


def _run(data: bytes, cuts: list[int], limits: FramerLimits) -> tuple[list[Event], FramingErrorReason | None, int]:
    """Feed ``data`` in pieces; events, error reason (or None) and bytes left buffered."""
    framer = Framer(limits)
    events: list[Event] = []
    try:
        for chunk in split_at(data, cuts):
            result = framer.feed(chunk)
            assert isinstance(result, list)
            for event in result:
                assert type(event) is bytes or event is PING_EVENT
            events += result
    except FramingError as error:
        assert isinstance(error.reason, FramingErrorReason)
        assert isinstance(error.header_block, bytes)
        return events, error.reason, -1
    return events, None, framer.buffered_bytes


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_arbitrary_bytes_give_events_or_framing_error(data: bytes, cuts: list[int]) -> None:
    events, reason, buffered = _run(data, cuts, SMALL_LIMITS)
    if reason is None:
        consumed = sum(len(e) if isinstance(e, bytes) else 4 for e in events)
        assert consumed + buffered <= len(data)


@PROPERTY_SETTINGS
@given(data=_SIP_ISH, cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_sip_like_bytes_frame_the_same_whole_or_split(data: bytes, cuts: list[int]) -> None:
    whole = _run(data, [], SMALL_LIMITS)
    split = _run(data, cuts, SMALL_LIMITS)
    bytewise = _run(data, list(range(len(data))), SMALL_LIMITS)
    assert split[1] == whole[1] == bytewise[1]
    if whole[1] is None:
        assert split == whole == bytewise
    else:
        # Events completed in the read that raised are lost with it: earlier reads keep theirs.
        assert whole[0] == []
        assert split[0] == bytewise[0][: len(split[0])]
    for event in whole[0]:
        if isinstance(event, bytes):
            assert len(event) <= SMALL_LIMITS.max_message_bytes
            assert event.index(b"\r\n\r\n") + 4 <= SMALL_LIMITS.max_header_bytes


_HEADER_NAMES = st.sampled_from(
    ["Via", "From", "To", "Call-ID", "CSeq", "Contact", "Subject", "X-Custom", "v", "f", "t", "i", "m", "Lx", "Length"]
)
_HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
_LENGTH_SPELLINGS = st.sampled_from(["Content-Length", "content-length", "CONTENT-LENGTH", "l", "L"])
_WHITESPACE = st.sampled_from(["", " ", "\t", "  ", " \t"])


@st.composite
def sip_messages(draw: st.DrawFn) -> bytes:
    """A random well-framed SIP message: random headers, one Content-Length, a random body."""
    start = draw(st.sampled_from(["INVITE sip:a@example.com SIP/2.0", "SIP/2.0 180 Ringing", "X y z"]))
    headers = [f"{n}: {v}" for n, v in draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=8))]
    body = draw(st.binary(max_size=300))
    length_line = f"{draw(_LENGTH_SPELLINGS)}{draw(_WHITESPACE)}:{draw(_WHITESPACE)}{len(body)}{draw(_WHITESPACE)}"
    headers.insert(draw(st.integers(min_value=0, max_value=len(headers))), length_line)
    return ("\r\n".join([start, *headers]) + "\r\n\r\n").encode() + body


@PROPERTY_SETTINGS
@given(
    messages=st.lists(st.tuples(sip_messages(), st.sampled_from([b"", b"\r\n", b"\r\n\r\n"])), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_valid_stream_splits_into_the_same_messages(messages: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    stream = b"".join(message + keepalive for message, keepalive in messages)
    expected: list[Event] = []
    for message, keepalive in messages:
        expected.append(message)
        if keepalive == b"\r\n\r\n":
            expected.append(PING_EVENT)
    assert feed_whole(stream) == expected
    assert feed_chunks(split_at(stream, cuts)) == expected


@PROPERTY_SETTINGS
@given(message=sip_messages())
def test_random_message_round_trips(message: bytes) -> None:
    framer = Framer()
    assert framer.feed(message) == [message]
    assert framer.buffered_bytes == 0
    assert feed_bytewise(message) == [message]


# -- corpus ----------------------------------------------------------------------------------------

CORPUS = Path(__file__).parent / "corpus"
_CORPUS_NAME = re.compile(r"ok_[a-z0-9_]+\.sip|err_(?P<outcome>[a-z_]+?)__[a-z0-9_]+\.sip")
_CORPUS_FILES = sorted(CORPUS.glob("*.sip"))


def test_corpus_names_follow_the_convention() -> None:
    outcomes: set[str] = set()
    for path in _CORPUS_FILES:
        match = _CORPUS_NAME.fullmatch(path.name)
        assert match is not None, path.name
        outcome = match["outcome"] or "ok"
        assert outcome in {"ok", "sip_request", "sip_response"} | {r.value for r in FramingErrorReason}, path.name
        outcomes.add(outcome)
    assert {"ok", "sip_request", "sip_response", "missing_content_length", "bad_content_length"} <= outcomes


@pytest.mark.parametrize("path", _CORPUS_FILES, ids=[path.stem for path in _CORPUS_FILES])
def test_corpus(path: Path) -> None:
    data = path.read_bytes()
    header_end = data.index(b"\r\n\r\n") + 4
    match = _CORPUS_NAME.fullmatch(path.name)
    assert match is not None
    outcome = match["outcome"] or "ok"
    if outcome in {r.value for r in FramingErrorReason}:
        for feed in (feed_whole, feed_bytewise):
            with pytest.raises(FramingError) as caught:
                feed(data)
            assert caught.value.reason == outcome
            assert caught.value.header_block == data[:header_end]
        return
    assert feed_whole(data) == [data]
    assert feed_bytewise(data) == [data]
    assert feed_whole(data + b"\r\n\r\n" + data) == [data, PING_EVENT, data]
    assert content_length(data[:header_end]) == len(data) - header_end
    if outcome == "ok":
        message = parse(data)
        assert message.body == data[header_end:]
        assert message.header("content-length") == str(len(message.body))
        if message.is_request:
            assert all(message.header(name) for name in ("via", "from", "to", "call-id", "cseq"))
            answer = response_for_unparsable(data, 500, "Server Internal Error")
            assert answer is not None
            response = parse(answer)
            assert response.values("via") == message.values("via")
            assert (response.header("to") or "").startswith(message.header("to") or "")
            assert (response.call_id, response.header("cseq")) == (message.call_id, message.header("cseq"))
        return
    with pytest.raises(SipParseError) as error:
        parse(data)
    assert error.value.is_request is (outcome == "sip_request")
    assert error.value.start_line == data.split(b"\r\n", 1)[0].decode()
