"""Inputs the atheris harnesses (fuzz/) found, each with its fix, as plain tests.

Every test keeps the fuzzer's input verbatim (replayed through the harness's
``check``, which must now pass) and states the fixed behaviour directly.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from sipwire.transport.sip import SipParseError, parse, split_list_value
from sipwire.transport.sipresponse import build_response, response_for_unparsable
from sipwire.transport.sipuri import SipUriError, parse_uri
from sipwire.transport.wire import RecordReader, WireError, WriteRecord, encode_done, encode_write
from tests.test_fuzz import require_atheris


def harness(target: str) -> ModuleType:
    """fuzz/fuzz_<target>.py, whose ``check`` replays an input (it needs atheris)."""
    require_atheris()
    return importlib.import_module(f"fuzz.fuzz_{target}")


# -- sipuri: str.isdigit() took non-ASCII digits, and int() then raised ValueError (not SipUriError) ------

#: fuzz_sip, URI mode: "[2001:db8::1]95061²" -- int() refused the superscript two with a bare ValueError.
PORT_SUPERSCRIPT_INPUT = (
    b"\x01sips:bob@[2001:db8::1]95061\xc2\xb2;transpoAlice <sip:\x01\x00\x00\x00alice@examp:bK1s;lm>;rt=tl\r\n"
    b"Via: S\x00OPTIP/2.0/TCP host:5060;branch=z9IONS sihG"
)


def test_fuzz_input_port_with_a_superscript_digit() -> None:
    harness("sip").check(PORT_SUPERSCRIPT_INPUT)


@pytest.mark.parametrize(
    "uri",
    [
        "sip:bob@example.com:5060\u00b2",  # "²": isdigit() but int() refuses it
        "sip:bob@example.com:\u0665\u0660\u0666\u0660",  # Arabic-Indic "5060": int() read it as a port
        "sip:bob@example.com:\uff15\uff10\uff16\uff10",  # full-width "5060"
        "sip:bob@example.com:" + "1" * 5000,  # int() refuses more than 4300 digits
        "sip:bob@example.com:0",  # not a port
        "sip:bob@example.com:065536",
        "sip:bob@[2001:db8::1]5060",  # a port needs its colon after an IPv6 reference too
        "sip:bob@[2001:db8::1]::5060",
    ],
)
def test_ports_are_ascii_digits_or_the_uri_is_refused(uri: str) -> None:
    with pytest.raises(SipUriError, match=r"port|IPv6"):
        parse_uri(uri)


def test_a_port_may_have_leading_zeros() -> None:
    """``port = 1*DIGIT`` (RFC 3261 section 25.1): leading zeros are legal, the value is what counts."""
    assert parse_uri("sip:bob@example.com:005060").port == 5060


@pytest.mark.parametrize(
    ("uri", "host", "port"),
    [
        ("sip:bob@example.com:5060", "example.com", 5060),
        ("sips:bob@[2001:db8::1]:5061;transport=tls", "2001:db8::1", 5061),
        ("sip:[::1]", "::1", None),
        ("sip:[::1]:", "::1", None),
        ("sip:example.com:65535", "example.com", 65535),
        ("sip:example.com:01", "example.com", 1),
    ],
)
def test_valid_ports_still_parse(uri: str, host: str, port: int | None) -> None:
    parsed = parse_uri(uri)
    assert (parsed.host, parsed.port) == (host, port)


# -- sip: a Via of only commas parsed, then build_response (and the proxy) indexed its empty value list ----

#: fuzz_sip, message mode: "v:," -- build_response(..., via_source=...) raised IndexError.
VIA_COMMA_INPUT = (
    b"\x00A s:x SIP/2.0\r\nv:,\r\nf:b\r\nt:/2.0\r\nv:a\r\nf:b\r\nt:c\r\ni:d\r\nCSeq:1 A\rc\r\ni:d\r\nCSeq:1 A\r\n"
    b"l:0\r\n\r\n"
)


def test_fuzz_input_via_of_only_a_comma() -> None:
    harness("sip").check(VIA_COMMA_INPUT)


def _request(via: str) -> bytes:
    return (
        f"OPTIONS sip:bob@example.com SIP/2.0\r\nVia: {via}\r\nFrom: <sip:a@example.com>;tag=1\r\n"
        "To: <sip:bob@example.com>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("via", [",", " , ,", ""])
def test_a_via_without_a_value_is_a_parse_error_answered_400(via: str) -> None:
    raw = _request(via)
    with pytest.raises(SipParseError, match="Via header without a value") as caught:
        parse(raw)
    assert caught.value.is_request, "a request: the worker answers it 400"
    answer = response_for_unparsable(raw, 400, "Bad Request")
    assert answer is not None and answer.startswith(b"SIP/2.0 400 Bad Request\r\n")


def test_a_response_with_an_empty_via_is_refused_too() -> None:
    raw = b"SIP/2.0 200 OK\r\nVia: ,\r\nCall-ID: c\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(SipParseError, match="Via header without a value") as caught:
        parse(raw)
    assert not caught.value.is_request


def test_vias_with_values_still_parse_and_are_answered() -> None:
    message = parse(_request("SIP/2.0/TCP a.example.com;branch=z9hG4bK1, SIP/2.0/TCP b.example.com,"))
    assert len(message.values("via")) == 2
    response = parse(build_response(message, 200, "OK", via_source=("192.0.2.1", 5060)))
    assert response.values("via")[0] == "SIP/2.0/TCP a.example.com;branch=z9hG4bK1;received=192.0.2.1"


# -- sip: a stray ">" drove split_list_value's bracket depth below zero, hiding the commas after it --------

#: fuzz_sip, message mode: the Via's "received=>:5060" made the whole folded line one value, so a second,
#: malformed Via behind a comma passed unchecked; the answer (without that received) split it and did not parse.
STRAY_BRACKET_INPUT = (
    b"\x00MESSAGE sip:user@example.com SIP/2.0\r\nVia  :  SIP/2.0/TCP host3example.co;branch=z9hG4bK77ef4c;"
    b'received=>:5060;branch=z9hG4bK-fold,\r\n   SIP/2.0h=z9hG4bK-two\r\nTO :\r\n "Folded, Name" '
    b"<sip:user@example.com>\r\nfrom: <sip:sender@example.com>;tag=ab12\r\nCALL-ID:\tfolded-call-id\r\n"
    b"cseq: 9\r\n\tMESSAGE\r\nSubject: a subject\r\n  continued\r\nContent-Type: text/plain\r\n"
    b"CONTENT-LENGTH  :   5   \r\n\r\nhello"
)


def test_fuzz_input_via_with_a_stray_closing_bracket() -> None:
    harness("sip").check(STRAY_BRACKET_INPUT)


def test_a_stray_closing_bracket_does_not_hide_the_values_after_it() -> None:
    assert split_list_value("a>b, c") == ["a>b", "c"]
    assert split_list_value("<sip:a>, <sip:b>") == ["<sip:a>", "<sip:b>"]
    assert split_list_value('"x>y" <sip:a>, <sip:b>') == ['"x>y" <sip:a>', "<sip:b>"]  # quoted: not a bracket
    with pytest.raises(SipParseError, match="Via"):
        parse(
            b"OPTIONS sip:b@example.com SIP/2.0\r\nVia: SIP/2.0/TCP h;received=>, SIP/2.0h=bad\r\n"
            b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n"
            b"Content-Length: 0\r\n\r\n"
        )


# -- wire: records decoded before a corrupt one were lost, so the outcome depended on how reads split -------

#: fuzz_wire, decode mode: a WRITE record then a header claiming 761488429 bytes. Fed whole, feed() raised
#: and the WRITE was gone; split after the WRITE, the first feed returned it.
WIRE_SPLIT_INPUT = (
    b"\x00\x00:\x03\x00\x00\x005\x00\x00\x00\x00\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x13\xc5"
    b"\x03\x0f\x0b::1sip\x00\x00\x00\x00\x00\x00\x00#.example.com00-ab-cd-01x"
)


def test_fuzz_input_records_before_a_corrupt_header() -> None:
    harness("wire").check(WIRE_SPLIT_INPUT)


@pytest.mark.parametrize("garbage", [b"\x63\xff\xff\xff\xff", b"\x09\x00\x00\x00\x01x", b"\x04\x00\x00\x00\x02ab"])
def test_a_wire_error_carries_the_records_decoded_before_it(garbage: bytes) -> None:
    good = encode_write(8, 0, "tls", "::1", 5061, b"a", server_name="sip.example.com") + encode_done(3, 2)
    with pytest.raises(WireError) as caught:
        RecordReader().feed(good + garbage)
    assert len(caught.value.records) == 2
    assert isinstance(caught.value.records[0], WriteRecord) and caught.value.records[0].payload == b"a"
    split = RecordReader()
    assert len(split.feed(good)) == 2
    with pytest.raises(WireError) as again:
        split.feed(garbage)
    assert again.value.records == []
