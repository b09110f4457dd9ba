"""Fuzz the SIP stream framer (``sipwire.transport.framing``) with atheris.

Run: ``python fuzz/fuzz_framer.py -max_total_time=60 CORPUS_DIR`` (libFuzzer flags;
a crash file as argument replays it). The corpus directory is seeded from
tests/corpus.

Input layout: 4 control bytes, then the stream.

* byte 0: the limits -- 0 for the defaults, else small ones derived from it and
  byte 1, so the too-large paths are reachable with short inputs;
* bytes 1-2: where to split the stream for the second feeding;
* byte 3: the chunk size (1..16) of the third feeding.

Invariants, for each of the three feedings (whole, split in two, in chunks):
``feed`` returns events or raises ``FramingError``, nothing else; all three give the
same events and the same error reason (or none); the consumed bytes are exactly
CR/LF padding and the completed messages, in order (so the messages re-concatenate
to a prefix of the input); each pad yields the pings the keep-alive rules give;
each message starts with a non-CR/LF byte, holds one CRLFCRLF-terminated header
block within the header limit, and is as long as its one Content-Length (checked
independently of the framer's regular expression) says, within the message limit;
what stays buffered is within the limits; a framing error's header block is a prefix
of the offending message; the best-effort answer built from it (if any) is one
well-framed SIP response. Every framed message is handed to ``sip.parse``, which
must parse it or raise ``SipParseError``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fuzz.common import enable_hooks

    enable_hooks()
    import atheris

    with atheris.instrument_imports(include=["sipwire"]):
        import sipwire.transport.framing
        import sipwire.transport.sip  # noqa: F401

from fuzz.common import assert_own_parts, run, sip_corpus
from sipwire.transport.framing import (
    CRLF,
    PING,
    Event,
    Framer,
    FramerLimits,
    FramingError,
    FramingErrorReason,
    Ping,
)
from sipwire.transport.sip import SipParseError, parse
from sipwire.transport.sipresponse import response_for_unparsable

CONTROL_BYTES = 4
CR_LF = frozenset(b"\r\n")


def limits_for(control: bytes) -> FramerLimits:
    """Default limits for a zero first byte; else small ones (headers 16..527, messages 16..1039 bytes)."""
    if control[0] == 0:
        return FramerLimits()
    max_header = 16 + (control[0] * 2 + control[1]) % 512
    max_message = 16 + (control[0] * 7 + control[1] * 3) % 1024
    return FramerLimits(max_message_bytes=max_message, max_header_bytes=max_header)


def stream_input(stream: bytes, limits_byte: int = 0, split: int = 0, chunk: int = 1) -> bytes:
    """A fuzzer input feeding ``stream`` with the given controls (used for seeds and tests)."""
    return bytes([limits_byte, (split >> 8) & 0xFF, split & 0xFF, chunk & 0xFF]) + stream


Outcome = tuple[list[Event], FramingError | None, Framer]


def feed(chunks: list[bytes], limits: FramerLimits) -> Outcome:
    """Feed ``chunks`` to a new framer until the first error; everything completed, the error, the framer."""
    framer = Framer(limits)
    events: list[Event] = []
    for chunk in chunks:
        try:
            events += framer.feed(chunk)
        except FramingError as error:
            assert isinstance(error.reason, FramingErrorReason), error.reason
            return events + error.events, error, framer
    return events, None, framer


def ping_count(pad: bytes) -> int:
    """Pings the keep-alive rules find in fully consumed CR/LF padding."""
    count = 0
    while pad:
        if pad.startswith(PING):
            count += 1
            pad = pad[4:]
        elif pad.startswith(CRLF):
            pad = pad[2:]
        else:
            pad = pad[1:]
    return count


def declared_length(header_block: bytes) -> int | None:
    """The one Content-Length (long or compact) of a header block, read line by line; None if not exactly one."""
    values = []
    for line in header_block.split(CRLF)[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.rstrip(b" \t").lower() in (b"content-length", b"l"):
            # The value ends at any CR or LF (a bare one inside a line too), as the framer reads it.
            end = min((i for i in (value.find(b"\r"), value.find(b"\n")) if i >= 0), default=len(value))
            values.append(value[:end].strip())
    if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 9:
        return None
    return int(values[0])


def check_message(message: bytes, limits: FramerLimits) -> None:
    assert message[0] not in CR_LF, f"message starts with padding: {message[:20]!r}"
    header_end = message.find(PING) + 4
    assert header_end >= 4, f"message without a header block: {message[:80]!r}"
    assert header_end <= limits.max_header_bytes, (header_end, limits)
    assert len(message) <= limits.max_message_bytes, (len(message), limits)
    length = declared_length(message[:header_end])
    assert length is not None, f"framed a message without exactly one valid Content-Length: {message[:200]!r}"
    assert len(message) == header_end + length, (len(message), header_end, length)
    with contextlib.suppress(SipParseError):
        parse(message)


def check_answer(header_block: bytes) -> None:
    """The best-effort 400 for a broken request is itself one well-framed, parsable SIP response."""
    answer = response_for_unparsable(header_block, 400, "Bad Request")
    if answer is None:
        return
    events = Framer(FramerLimits(1 << 20, 1 << 20)).feed(answer)
    assert events == [answer], f"the answer does not frame as itself: {answer!r} -> {events!r}"
    try:
        reply = parse(answer)
    except SipParseError:
        # Via, From, To, Call-ID and CSeq are copied as the broken request had them (RFC 4475 wants the 400
        # even when one of them is what is malformed): what the answer adds itself must be right.
        assert_own_parts(answer, 400)
        return
    assert reply.status == 400 and not reply.is_request, answer
    for name in ("via", "from", "to", "call-id", "cseq"):
        assert reply.header(name) is not None, (name, answer)


def check_layout(stream: bytes, outcome: Outcome, limits: FramerLimits) -> None:
    """Consumed bytes are padding and messages in order; pings match the padding; the rest is as expected."""
    events, error, framer = outcome
    position = 0
    pings = 0
    for event in events:
        if isinstance(event, Ping):
            assert event is not None
            pings += 1
            continue
        assert isinstance(event, bytes), type(event)
        start = position
        while start < len(stream) and stream[start] in CR_LF:
            start += 1
        assert pings == ping_count(stream[position:start]), (pings, stream[position:start])
        assert stream.startswith(event, start), f"message not found in the input at {start}: {event[:80]!r}"
        check_message(event, limits)
        position = start + len(event)
        pings = 0
    rest = stream[position:]
    if error is None:
        buffered = framer.buffered_bytes
        consumed = len(rest) - buffered
        assert consumed >= 0 and all(byte in CR_LF for byte in rest[:consumed]), (consumed, rest[:80])
        assert pings == ping_count(rest[:consumed]), (pings, rest[:consumed])
        left = rest[consumed:]
        assert framer.in_message == bool(left.lstrip(CRLF)), (framer.in_message, left[:80])
        if framer.in_message:
            assert left[0] not in CR_LF, left[:80]
        else:
            assert len(left) < 4 and PING.startswith(left), left  # at most a ping in the making
        if PING not in left:
            assert len(left) <= limits.max_header_bytes, (len(left), limits)
        else:
            assert len(left) < limits.max_message_bytes, (len(left), limits)
        return
    message_start = len(rest) - len(rest.lstrip(CRLF))
    assert pings == ping_count(rest[:message_start]), (pings, rest[:message_start])
    block = error.header_block
    assert rest.startswith(block, message_start), f"header block not in the input: {block[:80]!r}"
    if error.reason is FramingErrorReason.HEADERS_TOO_LARGE:
        assert not block or block.endswith(CRLF), block[-20:]
    else:
        assert block.endswith(PING), block[-20:]
        assert len(block) <= limits.max_header_bytes, (len(block), limits)
    assert str(error).startswith(error.reason.value), str(error)
    check_answer(block)


def check(data: bytes) -> None:
    if len(data) < CONTROL_BYTES:
        return
    control, stream = data[:CONTROL_BYTES], data[CONTROL_BYTES:]
    limits = limits_for(control)
    split = ((control[1] << 8) | control[2]) % (len(stream) + 1)
    size = 1 + control[3] % 16
    whole = feed([stream], limits)
    halves = feed([stream[:split], stream[split:]], limits)
    chunks = feed([stream[i : i + size] for i in range(0, len(stream), size)], limits)
    for name, other in (("split", halves), ("chunked", chunks)):
        assert other[0] == whole[0], f"{name} feeding gave other events: {other[0]!r} != {whole[0]!r}"
        reasons = (other[1] and other[1].reason, whole[1] and whole[1].reason)
        assert reasons[0] == reasons[1], f"{name} feeding ended otherwise: {reasons}"
        if whole[1] is None:
            assert other[2].buffered_bytes == whole[2].buffered_bytes, name
    check_layout(stream, whole, limits)


def seeds() -> list[bytes]:
    corpus = sip_corpus()
    messages = list(corpus.values())
    ok = [message for name, message in corpus.items() if name.startswith("ok_")]
    pipelined = PING.join(ok) + CRLF + b"\r\n\r\n\r\n" + ok[0][:40]
    out = [stream_input(message, split=len(message) // 2, chunk=7) for message in messages]
    out += [stream_input(message, limits_byte=9, split=30) for message in messages[:6]]
    out += [stream_input(pipelined, split=len(pipelined) // 3, chunk=3), stream_input(b"\r\n\r\n\r\n\r", chunk=1)]
    return out


if __name__ == "__main__":
    run(check, seeds, "sip.dict")
