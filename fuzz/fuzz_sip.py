"""Fuzz the SIP parser and URI parser (``sipwire.transport.sip``, ``sipwire.transport.sipuri``) with atheris.

Run: ``python fuzz/fuzz_sip.py -max_total_time=60 CORPUS_DIR`` (libFuzzer flags; a
crash file as argument replays it). The corpus directory is seeded from tests/corpus
and a few URIs.

The first byte picks the mode. 0 mod 4: the rest is one framed message, and its
text (UTF-8, undecodable bytes escaped as the parser does) is also a URI and a
name-addr. 2 mod 4: a valid INVITE whose Request-URI or one header value (byte 1
says which) is the rest, so short inputs reach what follows a successful parse.
Odd: the rest is only text, a URI, a name-addr and a Via sent-by: decoded as the
parser decodes (1 mod 4), or by atheris as ASCII, UTF-16 or UTF-32 as its first
byte says, so any code point is as likely as a letter (3 mod 4).
The dictionary (fuzz/sip.dict) has SIP tokens and characters Python's Unicode-aware
``str`` methods treat specially (non-ASCII digits, spaces and case mappings).
Invariants:

* ``parse`` returns a :class:`SipMessage` or raises ``SipParseError``, nothing else;
  a message is a response (status 100..999) or a request (upper-case method, a
  URI with a scheme, the mandatory headers), its body is what follows the first
  CRLFCRLF, and its header accessors do not fail;
* for a request, ``build_response`` (as the routers call it, with the source
  address for the top Via) gives one well-framed response that parses, with the
  request's Call-ID and CSeq;
* ``response_for_unparsable`` returns None or such a response, never for a
  response or an ACK;
* ``parse_uri`` returns a :class:`SipUri` or raises ``SipUriError``, nothing else:
  scheme sip or sips, a host, a port in 1..65535 or none; ``uri_of`` returns a
  string or raises ``SipUriError``; so for the Request-URI, the From, To and
  Contact values and each Via's sent-by (as ``sip:<sent-by>``, as the proxy reads
  it) of a parsed message.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fuzz.common import enable_hooks

    enable_hooks()

    with atheris.instrument_imports(include=["sipwire"]):
        import sipwire.transport.framing
        import sipwire.transport.sip
        import sipwire.transport.sipuri  # noqa: F401

from fuzz.common import assert_own_parts, run, sip_corpus
from sipwire.transport import sipsyntax
from sipwire.transport.framing import Framer, FramerLimits
from sipwire.transport.sip import MANDATORY_REQUEST_HEADERS, SipMessage, SipParseError, header_param, parse
from sipwire.transport.sipresponse import build_response, response_for_unparsable
from sipwire.transport.sipuri import SipUriError, parse_uri, uri_of

#: The source address the routers pass for the top Via's received/rport.
SOURCE = ("192.0.2.7", 5070)
#: Room enough to frame whatever answer an input up to libFuzzer's lengths gives.
ANSWER_LIMITS = FramerLimits(1 << 22, 1 << 22)


def check_uri(text: str) -> None:
    try:
        uri = parse_uri(text)
    except SipUriError:
        return
    assert uri.scheme in ("sip", "sips"), uri
    assert uri.host, uri
    assert uri.port is None or 0 < uri.port < 65536, uri
    assert 0 < uri.default_port() < 65536, uri
    assert isinstance(uri.transport, str) and isinstance(uri.address_of_record, str)


def check_name_addr(value: str) -> None:
    try:
        inner = uri_of(value)
    except SipUriError:
        return
    assert isinstance(inner, str)
    check_uri(inner)


def check_response(answer: bytes, status: int, request: SipMessage | None) -> None:
    """``answer`` is one well-framed response with ``status``, the mandatory headers, and the request's ids."""
    events = Framer(ANSWER_LIMITS).feed(answer)
    assert events == [answer], f"the answer does not frame as itself: {answer!r} -> {events!r}"
    try:
        reply = parse(answer)
    except SipParseError:
        # The headers are copied as a broken request had them (RFC 4475 wants the 400 even when one of them
        # is what is malformed); an answer to a request that parsed has nothing broken to copy.
        assert request is None, answer
        assert_own_parts(answer, status)
        return
    assert not reply.is_request and reply.status == status, answer
    for name in MANDATORY_REQUEST_HEADERS:
        assert reply.header(name) is not None, (name, answer)
    assert header_param(reply.header("to") or "", "tag") is not None or status == 100, answer
    if request is not None:
        assert reply.call_id == request.call_id, (reply.call_id, request.call_id)
        assert reply.header("cseq") == request.header("cseq"), answer


def check_message(data: bytes, message: SipMessage) -> None:
    assert message.body == data[data.find(b"\r\n\r\n") + 4 :]
    if message.is_request:
        assert sipsyntax.is_token(message.method), message.method  # any token: extension methods too
        assert ":" in message.uri, message.uri
        for name in MANDATORY_REQUEST_HEADERS:
            assert message.header(name) is not None, name
        check_uri(message.uri)
    else:
        assert 100 <= message.status <= 999, message.status
    for name, value in message.headers:
        assert name == name.lower() and name and " " not in name, name
        assert message.values(name) is not None and isinstance(value, str)
        assert isinstance(header_param(value, "tag"), str | None)
    assert isinstance(message.call_id, str) and isinstance(message.cseq_method, str)
    for name in ("from", "to", "contact"):
        for value in message.values(name):
            check_name_addr(value)
    for via in message.values("via"):
        check_uri(f"sip:{via.partition(' ')[2].split(';', 1)[0].strip()}")
    if message.is_request:
        check_response(build_response(message, 200, "OK", via_source=SOURCE), 200, message)
        check_response(
            build_response(message, 100, "Trying", extra_headers=[("Server", "fuzz")], body=b"x"), 100, message
        )


#: The request of the header mode: one of its values (or the Request-URI) is the fuzzer's.
TEMPLATE: tuple[tuple[str, str], ...] = (
    ("Via", "SIP/2.0/TCP client.example.com:5060;branch=z9hG4bK1;rport"),
    ("From", "Alice <sip:alice@example.com>;tag=1928301774"),
    ("To", "<sip:bob@example.com>"),
    ("Call-ID", "a84b4c76e66710@pc33.example.com"),
    ("CSeq", "314159 INVITE"),
    ("Contact", "<sip:alice@192.0.2.4:5060;transport=tcp>;expires=60"),
)


def templated(which: int, value: bytes) -> bytes:
    """The template request with ``value`` as the value of header ``which`` (past the last: the Request-URI)."""
    which %= len(TEMPLATE) + 1
    uri = value if which == len(TEMPLATE) else b"sip:bob@example.com"
    lines = [b"INVITE " + uri + b" SIP/2.0"]
    lines += [
        f"{name}: ".encode() + (value if i == which else text.encode()) for i, (name, text) in enumerate(TEMPLATE)
    ]
    return b"\r\n".join([*lines, b"Content-Length: 0", b"", b""])


def check(data: bytes) -> None:
    if not data:
        return
    if data[0] & 3 == 2 and len(data) >= 2:
        check_bytes(templated(data[1], data[2:]))
        return
    if data[0] & 1:
        if data[0] & 2:
            text = atheris.FuzzedDataProvider(data[1:]).ConsumeUnicode(len(data))
        else:
            text = data[1:].decode("utf-8", "surrogateescape")
        check_uri(text)
        check_uri(f"sip:{text}")
        check_name_addr(text)
        return
    check_bytes(data[1:])


def check_bytes(data: bytes) -> None:
    try:
        message = parse(data)
    except SipParseError as error:
        assert isinstance(error.detail, str) and isinstance(error.is_request, bool)
    else:
        check_message(data, message)
    answer = response_for_unparsable(data, 400, "Bad Request (fuzz)")
    if answer is not None:
        first_line = data.split(b"\r\n", 1)[0]
        assert not first_line.startswith((b"SIP/", b"ACK ")), f"answered a response or an ACK: {first_line!r}"
        check_response(answer, 400, None)
    text = data.decode("utf-8", "surrogateescape")
    check_uri(text)
    check_name_addr(text)


def seeds() -> list[bytes]:
    uris = [
        "sip:alice@example.com",
        "sips:bob@[2001:db8::1]:5061;transport=tls;lr",
        "sip:carol@192.0.2.1:5060;user=phone?subject=hi",
        '"Bob" <sip:bob@example.com:5070>;tag=a6c85cf',
        "<sips:[::1]>;expires=60",
        "SIP:UPPER@HOST:1",
    ]
    minimal = b"A s:x SIP/2.0\r\nv:a\r\nf:b\r\nt:c\r\ni:d\r\nCSeq:1 A\r\nl:0\r\n\r\n"
    messages = [*sip_corpus().values(), minimal]
    values = [(i, text.encode()) for i, (_, text) in enumerate(TEMPLATE)] + [(len(TEMPLATE), b"sip:bob@example.com")]
    return (
        [b"\x00" + message for message in messages]
        + [b"\x01" + uri.encode() for uri in uris]
        + [bytes([2, which]) + value for which, value in values]
    )


if __name__ == "__main__":
    run(check, seeds, "sip.dict")
