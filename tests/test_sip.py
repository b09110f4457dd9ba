"""SIP parser and response builder: vectors, error cases, response rules and a property test."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipwire.transport import sip, sipsyntax
from sipwire.transport.framing import Framer
from sipwire.transport.sip import (
    COMPACT_FORMS,
    MANDATORY_REQUEST_HEADERS,
    SINGLE_HEADERS,
    SipMessage,
    SipParseError,
    header_param,
    parse,
    split_list_value,
)
from sipwire.transport.sipresponse import build_response, fill_via_received, new_tag, response_for_unparsable

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)


def crlf(text: str) -> bytes:
    """A message written with one line per source line: newlines become CRLF."""
    return text.replace("\n", "\r\n").encode()


# RFC 3261 section 24.2, message F1 (Alice's INVITE), with a small SDP body.
INVITE_BODY = b"v=0\r\no=alice 2890844526 2890844526 IN IP4 pc33.atlanta.com\r\ns=-\r\n"
INVITE = (
    crlf(
        "INVITE sip:bob@biloxi.com SIP/2.0\n"
        "Via: SIP/2.0/TCP pc33.atlanta.com;branch=z9hG4bK776asdhds\n"
        "Max-Forwards: 70\n"
        "To: Bob <sip:bob@biloxi.com>\n"
        "From: Alice <sip:alice@atlanta.com>;tag=1928301774\n"
        "Call-ID: a84b4c76e66710@pc33.atlanta.com\n"
        "CSeq: 314159 INVITE\n"
        "Contact: <sip:alice@pc33.atlanta.com>\n"
        "Content-Type: application/sdp\n"
        f"Content-Length: {len(INVITE_BODY)}\n"
        "\n"
    )
    + INVITE_BODY
)

# RFC 3261 section 24.2, message F9 (Bob's 200 OK to the BYE), via two proxies.
RESPONSE = crlf(
    "SIP/2.0 200 OK\n"
    "Via: SIP/2.0/TCP server10.biloxi.com;branch=z9hG4bKnashds8;received=192.0.2.3\n"
    "Via: SIP/2.0/TCP bigbox3.site3.atlanta.com;branch=z9hG4bK77ef4c2312983.1;received=192.0.2.2\n"
    "Via: SIP/2.0/TCP pc33.atlanta.com;branch=z9hG4bK776asdhds ;received=192.0.2.1\n"
    "To: Bob <sip:bob@biloxi.com>;tag=a6c85cf\n"
    "From: Alice <sip:alice@atlanta.com>;tag=1928301774\n"
    "Call-ID: a84b4c76e66710@pc33.atlanta.com\n"
    "CSeq: 231 BYE\n"
    "Content-Length: 0\n"
    "\n"
)

MANDATORY_LINES = {
    "via": "Via: SIP/2.0/TCP client.example.com:5060;branch=z9hG4bK74bf9",
    "from": "From: Alice <sip:alice@example.com>;tag=9fxced76sl",
    "to": "To: Bob <sip:bob@example.com>",
    "call-id": "Call-ID: 3848276298220188511@example.com",
    "cseq": "CSeq: 2 OPTIONS",
}


def options(*extra: str, without: str = "", start: str = "OPTIONS sip:bob@example.com SIP/2.0") -> bytes:
    """An OPTIONS request with the mandatory headers (minus ``without``) and ``extra`` lines.

    CSeq names the method of ``start``, as RFC 3261 section 8.1.1.5 requires.
    """
    mandatory = {**MANDATORY_LINES, "cseq": f"CSeq: 2 {start.partition(' ')[0]}"}
    lines = [start, *(line for key, line in mandatory.items() if key != without), *extra, "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- requests and responses ------------------------------------------------------------------------


def test_parse_rfc3261_invite() -> None:
    message = parse(INVITE)
    assert message.is_request
    assert message.start_line == "INVITE sip:bob@biloxi.com SIP/2.0"
    assert message.method == "INVITE"
    assert message.uri == "sip:bob@biloxi.com"
    assert message.status == 0
    assert message.reason == ""
    assert message.body == INVITE_BODY
    assert message.call_id == "a84b4c76e66710@pc33.atlanta.com"
    assert message.cseq_method == "INVITE"
    assert message.header("max-forwards") == "70"
    assert message.header("To") == "Bob <sip:bob@biloxi.com>"
    assert message.header("Content-Length") == str(len(INVITE_BODY))
    assert [name for name, _ in message.headers] == [
        "via",
        "max-forwards",
        "to",
        "from",
        "call-id",
        "cseq",
        "contact",
        "content-type",
        "content-length",
    ]
    assert message.index["cseq"] == [5]
    assert message.header("record-route") is None
    assert message.header_lines("record-route") == []
    assert message.values("record-route") == []


def test_parse_rfc3261_response() -> None:
    message = parse(RESPONSE)
    assert not message.is_request
    assert message.status == 200
    assert message.reason == "OK"
    assert message.method == ""
    assert message.uri == ""
    assert message.cseq_method == "BYE"
    assert message.body == b""
    assert message.values("via") == [
        "SIP/2.0/TCP server10.biloxi.com;branch=z9hG4bKnashds8;received=192.0.2.3",
        "SIP/2.0/TCP bigbox3.site3.atlanta.com;branch=z9hG4bK77ef4c2312983.1;received=192.0.2.2",
        "SIP/2.0/TCP pc33.atlanta.com;branch=z9hG4bK776asdhds ;received=192.0.2.1",
    ]


@pytest.mark.parametrize(
    ("start_line", "status", "reason"),
    [
        ("SIP/2.0 100 Trying", 100, "Trying"),
        ("SIP/2.0 180 Ringing", 180, "Ringing"),
        ("SIP/2.0 302 Moved Temporarily", 302, "Moved Temporarily"),
        ("SIP/2.0 486 Busy Here", 486, "Busy Here"),
        ("SIP/2.0 603 Decline", 603, "Decline"),
        ("SIP/2.0 699 ", 699, ""),
        ("SIP/2.0 200 OK  with  spaces", 200, "OK  with  spaces"),
        ("SIP/2.0 200 Très bien", 200, "Très bien"),
    ],
)
def test_status_lines(start_line: str, status: int, reason: str) -> None:
    message = parse(f"{start_line}\r\nContent-Length: 0\r\n\r\n".encode())
    assert message.status == status
    assert message.reason == reason
    assert not message.is_request


def test_responses_need_no_mandatory_headers() -> None:
    message = parse(b"SIP/2.0 200 OK\r\n\r\n")
    assert message.status == 200
    assert message.headers == []


@pytest.mark.parametrize("method", ["ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "SUBSCRIBE", "NOTIFY", "MESSAGE"])
def test_methods(method: str) -> None:
    message = parse(options(start=f"{method} sips:bob@example.com;transport=tcp SIP/2.0"))
    assert message.method == method
    assert message.uri == "sips:bob@example.com;transport=tcp"


def test_body_is_everything_after_the_first_crlfcrlf() -> None:
    raw = options().replace(b"Content-Length: 0", b"Content-Length: 12") + b"\r\n\r\nbinary\x00\xff"
    assert parse(raw).body == b"\r\n\r\nbinary\x00\xff"


def test_non_utf8_header_bytes_survive() -> None:
    message = parse(options().replace(b"Content-Length", b"Subject: caf\xe9\r\nContent-Length", 1))
    subject = message.header("subject")
    assert subject is not None
    assert subject.encode("utf-8", "surrogateescape") == b"caf\xe9"


# -- header names, folding, compact forms, lists ---------------------------------------------------


def test_header_folding_joins_continuation_lines_with_one_space() -> None:
    message = parse(
        options(
            "Subject: I know you're there,",
            "    pick up the phone",
            "\t and talk to me!",
            "Route: <sip:p1.example.com;lr>,",
            " <sip:p2.example.com;lr>",
        )
    )
    assert message.header("subject") == "I know you're there, pick up the phone and talk to me!"
    assert message.values("route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert message.header_lines("route") == ["<sip:p1.example.com;lr>, <sip:p2.example.com;lr>"]


def test_folding_onto_an_empty_value() -> None:
    # Regression: the joined value used to keep a leading space, so CSeq's method came out as "1 INVITE".
    raw = options().replace(b"CSeq: 2 OPTIONS", b"CSeq:\r\n 2 OPTIONS")
    message = parse(raw)
    assert message.header("cseq") == "2 OPTIONS"
    assert message.cseq_method == "OPTIONS"
    folded_twice = parse(options("Subject:", " ", "\tend"))
    assert folded_twice.header("subject") == "end"


def test_continuation_before_first_header_is_an_error() -> None:
    with pytest.raises(SipParseError) as caught:
        parse(b"OPTIONS sip:a@b SIP/2.0\r\n folded\r\nVia: x\r\n\r\n")
    assert caught.value.detail == "continuation line before the first header"
    assert caught.value.is_request


def test_header_names_are_case_insensitive() -> None:
    message = parse(options("sUbJeCt: hi", "X-CUSTOM: 1", "x-custom: 2"))
    for name in ("subject", "SUBJECT", "Subject", "s"):
        assert message.header(name) == "hi"
    assert message.header_lines("X-Custom") == ["1", "2"]
    assert message.header("CALL-ID") == "3848276298220188511@example.com"
    assert message.header("i") == "3848276298220188511@example.com"
    assert message.headers[-4:-1] == [("subject", "hi"), ("x-custom", "1"), ("x-custom", "2")]


def test_whitespace_around_colon_and_value() -> None:
    message = parse(options("Subject  :   spaced out  ", "Priority\t:\turgent\t"))
    assert message.header("subject") == "spaced out"
    assert message.header("priority") == "urgent"


def test_compact_forms_rfc3261() -> None:
    raw = crlf(
        "INVITE sip:bob@biloxi.com SIP/2.0\n"
        "v: SIP/2.0/TCP pc33.atlanta.com;branch=z9hG4bK776asdhds\n"
        "f: <sip:alice@atlanta.com>;tag=1928301774\n"
        "t: <sip:bob@biloxi.com>\n"
        "i: a84b4c76e66710\n"
        "CSeq: 1 INVITE\n"
        "m: <sip:alice@pc33.atlanta.com>\n"
        "c: application/sdp\n"
        "e: gzip\n"
        "s: compact\n"
        "k: path\n"
        "l: 0\n"
        "\n"
    )
    message = parse(raw)
    assert dict(message.headers) == {
        "via": "SIP/2.0/TCP pc33.atlanta.com;branch=z9hG4bK776asdhds",
        "from": "<sip:alice@atlanta.com>;tag=1928301774",
        "to": "<sip:bob@biloxi.com>",
        "call-id": "a84b4c76e66710",
        "cseq": "1 INVITE",
        "contact": "<sip:alice@pc33.atlanta.com>",
        "content-type": "application/sdp",
        "content-encoding": "gzip",
        "subject": "compact",
        "supported": "path",
        "content-length": "0",
    }
    assert message.call_id == "a84b4c76e66710"
    assert message.header("Via") == message.header("V")


#: Values the grammar checks of sip.parse accept, for the headers it checks; other headers take any text.
CHECKED_VALUES = {
    "via": "SIP/2.0/TCP value-v",
    "from": "<sip:value-f@h>;tag=1",
    "to": "<sip:value-t@h>",
    "call-id": "value-i",
    "contact": "<sip:value-m@h>",
    "content-length": "0",
}


@pytest.mark.parametrize(("compact", "full"), sorted(COMPACT_FORMS.items()))
def test_every_compact_form(compact: str, full: str) -> None:
    value = CHECKED_VALUES.get(full, f"value-{compact}")
    # A single-valued header given twice is an error (RFC 4475 section 3.3.8): replace the mandatory line.
    message = parse(options(f"{compact.upper()}: {value}", without=full if full in SINGLE_HEADERS else ""))
    assert value in message.header_lines(full)
    assert message.header_lines(compact) == message.header_lines(full.upper())
    assert message.headers[-2] == (full, value)


def test_compact_and_full_lines_share_one_header() -> None:
    message = parse(options("m: <sip:a@h1>", "Contact: <sip:b@h2>, <sip:c@h3>", "M: <sip:d@h4>"))
    assert message.header_lines("contact") == ["<sip:a@h1>", "<sip:b@h2>, <sip:c@h3>", "<sip:d@h4>"]
    assert message.values("m") == ["<sip:a@h1>", "<sip:b@h2>", "<sip:c@h3>", "<sip:d@h4>"]
    assert message.header("contact") == "<sip:a@h1>"


def test_multiple_vias_repeated_lines_and_comma_list_keep_order() -> None:
    message = parse(
        options(without="via")
        .replace(b"From:", b"Via: SIP/2.0/TCP a;branch=z9hG4bK1, SIP/2.0/TCP b;branch=z9hG4bK2\r\nFrom:", 1)
        .replace(b"To:", b"v: SIP/2.0/TLS c;branch=z9hG4bK3\r\nTo:", 1)
    )
    assert message.values("via") == [
        "SIP/2.0/TCP a;branch=z9hG4bK1",
        "SIP/2.0/TCP b;branch=z9hG4bK2",
        "SIP/2.0/TLS c;branch=z9hG4bK3",
    ]
    assert message.index["via"] == [0, 2]


def test_commas_inside_quotes_and_brackets_do_not_split() -> None:
    message = parse(
        options(
            'Contact: "Doe, John" <sip:john@example.com;x=a,b>;q=0.5, <sip:other@example.com>',
            'Contact: "Quote \\" , inside" <sip:q@example.com>',
        )
    )
    assert message.values("contact") == [
        '"Doe, John" <sip:john@example.com;x=a,b>;q=0.5',
        "<sip:other@example.com>",
        '"Quote \\" , inside" <sip:q@example.com>',
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        (" a , b ,c ", ["a", "b", "c"]),
        ("a,,b,", ["a", "b"]),
        ('"x,y", z', ['"x,y"', "z"]),
        ('"x\\",y", z', ['"x\\",y"', "z"]),
        ("<sip:a,b>, <sip:c>", ["<sip:a,b>", "<sip:c>"]),
        ('"<", b', ['"<"', "b"]),
        ('Digest realm="a, b", nonce="c"', ['Digest realm="a, b"', 'nonce="c"']),
    ],
)
def test_split_list_value(value: str, expected: list[str]) -> None:
    assert split_list_value(value) == expected


@pytest.mark.parametrize(
    ("value", "name", "expected"),
    [
        ("<sip:bob@example.com>;tag=abc", "tag", "abc"),
        ("<sip:bob@example.com;tag=uri>;tag=hdr", "tag", "hdr"),
        ("<sip:bob@example.com;tag=uri>", "tag", None),
        ("sip:bob@example.com;tag=abc", "tag", "abc"),
        ("<sip:a>; TAG = spaced ", "tag", "spaced"),
        ("<sip:a>;expires=60;q=0.7", "expires", "60"),
        ("<sip:a>;lr", "lr", ""),
        ("<sip:a>", "lr", None),
        ("SIP/2.0/TCP h;rport;branch=z9hG4bK1", "rport", ""),
    ],
)
def test_header_param(value: str, name: str, expected: str | None) -> None:
    assert header_param(value, name) == expected


# -- parse errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", MANDATORY_REQUEST_HEADERS)
def test_missing_mandatory_header(missing: str) -> None:
    with pytest.raises(SipParseError) as caught:
        parse(options(without=missing))
    names = {"via": "Via", "from": "From", "to": "To", "call-id": "Call-ID", "cseq": "CSeq"}
    assert caught.value.detail == f"missing mandatory header {names[missing]}"
    assert str(caught.value) == caught.value.detail
    assert caught.value.start_line == "OPTIONS sip:bob@example.com SIP/2.0"
    assert caught.value.is_request


def test_compact_forms_satisfy_mandatory_headers() -> None:
    raw = b"BYE sip:a@b SIP/2.0\r\nv: SIP/2.0/TCP h\r\nf: <sip:x>;tag=1\r\nt: <sip:y>\r\ni: id\r\nCSeq: 1 BYE\r\n\r\n"
    assert parse(raw).method == "BYE"


@pytest.mark.parametrize(
    ("start_line", "detail", "is_request"),
    [
        ("INVITE sip:a@b", "malformed start line 'INVITE sip:a@b'", True),
        ("", "malformed start line ''", False),
        ("INVITE sip:a@b SIP/3.0", "unsupported protocol version 'SIP/3.0'", True),
        ("INVITE sip:a@b sip/2.0", "unsupported protocol version 'sip/2.0'", True),
        ("INVITE sip:a@b HTTP/1.1", "unsupported protocol version 'HTTP/1.1'", True),
        (
            "INVITE sip:a@b SIP/2.0 extra",
            "malformed request line 'INVITE sip:a@b SIP/2.0 extra': one space between its three parts",
            True,
        ),
        (
            "INVITE  sip:a@b SIP/2.0",
            "malformed request line 'INVITE  sip:a@b SIP/2.0': one space between its three parts",
            True,
        ),
        ("IN<VITE sip:a@b SIP/2.0", "invalid method 'IN<VITE'", True),
        ("INVITE bob SIP/2.0", "Request-URI 'bob' has no scheme", True),
        ("INVITE <sip:a@b> SIP/2.0", "Request-URI '<sip:a@b>' has no scheme", True),
        ("INVITE sip:a@b?Route=x SIP/2.0", "Request-URI 'sip:a@b?Route=x' carries headers", True),
        ("SIP/2.0 700 Beyond", "invalid status code '700'", False),
        ("SIP/2.0 20 OK", "invalid status code '20'", False),
        ("SIP/2.0 2000 OK", "invalid status code '2000'", False),
        ("SIP/2.0 099 Low", "invalid status code '099'", False),
        ("SIP/2.0 abc OK", "invalid status code 'abc'", False),
        ("SIP/2.0 ²²² OK", "invalid status code '²²²'", False),
        ("SIP/2.0 \u0661\u0660\u0660 OK", "invalid status code '\u0661\u0660\u0660'", False),
        ("SIP/2.0 200", "malformed start line 'SIP/2.0 200'", False),
        ("SIP/1.0 200 OK", "unsupported protocol version 'OK'", False),
    ],
)
def test_bad_start_lines(start_line: str, detail: str, is_request: bool) -> None:
    with pytest.raises(SipParseError) as caught:
        parse(f"{start_line}\r\nContent-Length: 0\r\n\r\n".encode())
    assert caught.value.detail == detail
    assert caught.value.start_line == start_line
    assert caught.value.is_request is is_request
    assert caught.value.status == (505 if start_line.endswith("SIP/3.0") else 400)  # another SIP version


def test_another_sip_version_is_answered_505() -> None:
    with pytest.raises(SipParseError) as caught:
        parse(options(start="OPTIONS sip:a@b SIP/7.0"))
    assert (caught.value.status, caught.value.reason_phrase) == (505, "Version Not Supported")
    assert caught.value.detail == "unsupported protocol version 'SIP/7.0'"


@pytest.mark.parametrize("method", ["invite", "IN-VITE", "NEWMETHOD", "!interesting-Method0123456789_*+`.%indeed'~"])
def test_extension_methods_are_any_case_sensitive_token(method: str) -> None:
    """RFC 3261 section 7.1: a method is a token; ``invite`` is not INVITE but an extension method."""
    message = parse(options(start=f"{method} sip:a@b SIP/2.0"))
    assert message.method == message.cseq_method == method


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        ("No colon here", "header line without a colon: 'No colon here'"),
        (": empty name", "invalid header name ''"),
        ("Bad Name: x", "invalid header name 'Bad Name'"),
        ("Bad\tName: x", "invalid header name 'Bad\\tName'"),
    ],
)
def test_bad_header_lines(line: str, detail: str) -> None:
    raw = options().replace(b"Content-Length", line.encode() + b"\r\nContent-Length", 1)
    with pytest.raises(SipParseError) as caught:
        parse(raw)
    assert caught.value.detail == detail
    assert caught.value.is_request


def test_no_end_of_headers() -> None:
    with pytest.raises(SipParseError) as caught:
        parse(b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n")
    assert caught.value.detail == "no CRLFCRLF after the header block"
    assert caught.value.start_line == ""
    assert not caught.value.is_request


def test_sip_parse_error_is_request() -> None:
    assert SipParseError("x", "INVITE sip:a SIP/2.0").is_request
    assert not SipParseError("x", "SIP/2.0 200 OK").is_request
    assert not SipParseError("x").is_request


# -- build_response --------------------------------------------------------------------------------

MULTI_VIA_REQUEST = crlf(
    "BYE sip:bob@192.0.2.4 SIP/2.0\n"
    "Via: SIP/2.0/TCP proxy.example.com:5060;branch=z9hG4bKp1;rport, SIP/2.0/TCP relay.example.com;branch=z9hG4bKr\n"
    "v: SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKc\n"
    "Max-Forwards: 69\n"
    'f: "Alice, A." <sip:alice@atlanta.com>;tag=1928301774\n'
    "t: Bob <sip:bob@biloxi.com>;tag=a6c85cf\n"
    "i: a84b4c76e66710@pc33.atlanta.com\n"
    "CSeq: 231 BYE\n"
    "l: 0\n"
    "\n"
)


def test_build_response_copies_dialog_headers() -> None:
    request = parse(MULTI_VIA_REQUEST)
    response = build_response(request, 200, "OK")
    assert response == crlf(
        "SIP/2.0 200 OK\n"
        "Via: SIP/2.0/TCP proxy.example.com:5060;branch=z9hG4bKp1;rport,"
        " SIP/2.0/TCP relay.example.com;branch=z9hG4bKr\n"
        "Via: SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKc\n"
        'From: "Alice, A." <sip:alice@atlanta.com>;tag=1928301774\n'
        "To: Bob <sip:bob@biloxi.com>;tag=a6c85cf\n"
        "Call-ID: a84b4c76e66710@pc33.atlanta.com\n"
        "CSeq: 231 BYE\n"
        "Content-Length: 0\n"
        "\n"
    )


def test_build_response_fills_top_via_only() -> None:
    request = parse(MULTI_VIA_REQUEST)
    response = parse(build_response(request, 200, "OK", via_source=("198.51.100.7", 40123)))
    assert response.values("via") == [
        "SIP/2.0/TCP proxy.example.com:5060;branch=z9hG4bKp1;rport=40123;received=198.51.100.7",
        "SIP/2.0/TCP relay.example.com;branch=z9hG4bKr",
        "SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKc",
    ]
    assert response.header_lines("via")[1] == "SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKc"


def test_build_response_adds_to_tag_only_when_missing() -> None:
    request = parse(options())
    ok = parse(build_response(request, 200, "OK", to_tag="fixedtag"))
    assert ok.header("to") == "Bob <sip:bob@example.com>;tag=fixedtag"
    trying = parse(build_response(request, 100, "Trying", to_tag="fixedtag"))
    assert trying.header("to") == "Bob <sip:bob@example.com>"
    ringing = parse(build_response(request, 180, "Ringing"))
    tag = header_param(ringing.header("to") or "", "tag")
    assert tag is not None
    assert re.fullmatch(r"[0-9a-f]{12}", tag)
    in_dialog = parse(MULTI_VIA_REQUEST)
    again = parse(build_response(in_dialog, 486, "Busy Here", to_tag="other"))
    assert again.header("to") == "Bob <sip:bob@biloxi.com>;tag=a6c85cf"


def test_build_response_with_body_and_extra_headers() -> None:
    request = parse(INVITE)
    body = b"v=0\r\ns=answer\r\n"
    raw = build_response(
        request,
        200,
        "OK",
        to_tag="t1",
        extra_headers=[("Contact", "<sip:bob@192.0.2.4>"), ("Content-Type", "application/sdp")],
        body=body,
    )
    assert raw.endswith(b"Content-Length: 15\r\n\r\n" + body)
    assert Framer().feed(raw) == [raw]
    response = parse(raw)
    assert response.status == 200
    assert response.reason == "OK"
    assert response.body == body
    assert [name for name, _ in response.headers] == [
        "via",
        "from",
        "to",
        "call-id",
        "cseq",
        "contact",
        "content-type",
        "content-length",
    ]
    assert response.header("via") == "SIP/2.0/TCP pc33.atlanta.com;branch=z9hG4bK776asdhds"
    assert response.header("from") == "Alice <sip:alice@atlanta.com>;tag=1928301774"
    assert response.header("to") == "Bob <sip:bob@biloxi.com>;tag=t1"
    assert response.call_id == "a84b4c76e66710@pc33.atlanta.com"
    assert response.header("cseq") == "314159 INVITE"
    assert response.header("content-length") == "15"


def test_build_response_counts_body_bytes_not_characters() -> None:
    body = "é".encode() * 3
    raw = build_response(parse(options()), 200, "OK", body=body)
    assert parse(raw).header("content-length") == "6"


# -- Via received / rport (RFC 3261 18.2.1, RFC 3581) ----------------------------------------------


@pytest.mark.parametrize(
    ("via", "source", "expected"),
    [
        # RFC 3581 section 4 example: rport filled and received added.
        (
            "SIP/2.0/UDP 10.1.1.1:4540;rport;branch=z9hG4bKkjshdyff",
            ("192.0.2.1", 9988),
            "SIP/2.0/UDP 10.1.1.1:4540;rport=9988;branch=z9hG4bKkjshdyff;received=192.0.2.1",
        ),
        # rport asked for: received added even when the host matches.
        (
            "SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK1;rport",
            ("192.0.2.1", 5070),
            "SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK1;rport=5070;received=192.0.2.1",
        ),
        # No rport, same host: unchanged.
        (
            "SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK1",
            ("192.0.2.1", 40000),
            "SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK1",
        ),
        ("SIP/2.0/TCP 192.0.2.1", ("192.0.2.1", 40000), "SIP/2.0/TCP 192.0.2.1"),
        # No rport, other host or a name: received only.
        (
            "SIP/2.0/TCP pc33.atlanta.com;branch=z9hG4bK1",
            ("192.0.2.1", 40000),
            "SIP/2.0/TCP pc33.atlanta.com;branch=z9hG4bK1;received=192.0.2.1",
        ),
        ("SIP/2.0/TCP 10.0.0.1:5060", ("192.0.2.1", 1), "SIP/2.0/TCP 10.0.0.1:5060;received=192.0.2.1"),
        # IPv6 sent-by.
        (
            "SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bK1",
            ("2001:db8::1", 5060),
            "SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bK1",
        ),
        (
            "SIP/2.0/TCP [2001:db8::1];rport",
            ("2001:db8::2", 6000),
            "SIP/2.0/TCP [2001:db8::1];rport=6000;received=2001:db8::2",
        ),
        # A stale received is replaced, an rport value overwritten.
        (
            "SIP/2.0/TCP h.example.com;received=10.9.9.9;rport=1;branch=z9hG4bK1",
            ("192.0.2.8", 7000),
            "SIP/2.0/TCP h.example.com;rport=7000;branch=z9hG4bK1;received=192.0.2.8",
        ),
        (
            "SIP/2.0/TCP 192.0.2.8;received=10.9.9.9",
            ("192.0.2.8", 7000),
            "SIP/2.0/TCP 192.0.2.8",
        ),
        (
            "SIP/2.0/TCP 192.0.2.8;RPort",
            ("192.0.2.8", 7000),
            "SIP/2.0/TCP 192.0.2.8;rport=7000;received=192.0.2.8",
        ),
    ],
)
def test_fill_via_received(via: str, source: tuple[str, int], expected: str) -> None:
    assert fill_via_received(via, *source) == expected


def test_new_tag() -> None:
    tags = {new_tag() for _ in range(50)}
    assert len(tags) == 50
    assert all(re.fullmatch(r"[0-9a-f]{12}", tag) for tag in tags)


# -- response_for_unparsable -----------------------------------------------------------------------


def test_response_for_unparsable_answers_a_request() -> None:
    block = options(
        "Via: SIP/2.0/TCP second.example.com;branch=z9hG4bK2",
        "X-Broken line",
        "Content-Length: -5",
    )
    answer = response_for_unparsable(block, 400, "Bad Request (bad_content_length)")
    assert answer is not None
    lines = answer.decode().split("\r\n")
    assert lines[0] == "SIP/2.0 400 Bad Request (bad_content_length)"
    assert lines[1:3] == [
        "Via: SIP/2.0/TCP client.example.com:5060;branch=z9hG4bK74bf9",
        "Via: SIP/2.0/TCP second.example.com;branch=z9hG4bK2",
    ]
    assert lines[3] == "From: Alice <sip:alice@example.com>;tag=9fxced76sl"
    assert re.fullmatch(r"To: Bob <sip:bob@example\.com>;tag=[0-9a-f]{12}", lines[4])
    assert lines[5:] == [
        "Call-ID: 3848276298220188511@example.com",
        "CSeq: 2 OPTIONS",
        "Content-Length: 0",
        "",
        "",
    ]
    assert Framer().feed(answer) == [answer]
    assert parse(answer).status == 400


def test_response_for_unparsable_keeps_an_existing_to_tag_and_reads_compact_forms() -> None:
    block = crlf(
        "BYE sip:a@b SIP/2.0\nv: SIP/2.0/TCP h;branch=z9hG4bK9\n"
        "f: <sip:x>;tag=1\nt: <sip:y>;tag=2\ni: cid\nCSeq: 7 BYE\n\n"
    )
    answer = response_for_unparsable(block, 500, "Server Internal Error")
    assert answer == crlf(
        "SIP/2.0 500 Server Internal Error\n"
        "Via: SIP/2.0/TCP h;branch=z9hG4bK9\n"
        "From: <sip:x>;tag=1\n"
        "To: <sip:y>;tag=2\n"
        "Call-ID: cid\n"
        "CSeq: 7 BYE\n"
        "Content-Length: 0\n"
        "\n"
    )


def test_response_for_unparsable_unfolds_continuation_lines() -> None:
    # Regression: continuation lines were dropped, losing a folded branch or the whole To value.
    block = crlf(
        "INVITE sip:bob@example.com SIP/2.0\n"
        "Via: SIP/2.0/TCP client.example.com:5060\n"
        "  ;branch=z9hG4bKfolded\n"
        "From: <sip:alice@example.com>;tag=1\n"
        "To:\n"
        "\tBob <sip:bob@example.com>\n"
        "Subject: not wanted\n"
        " Via: not a header either\n"
        "Call-ID: folded-1\n"
        "CSeq: 4\n"
        " INVITE\n"
        "\n"
    )
    answer = response_for_unparsable(block, 400, "Bad Request")
    assert answer is not None
    response = parse(answer)
    assert response.values("via") == ["SIP/2.0/TCP client.example.com:5060 ;branch=z9hG4bKfolded"]
    assert re.fullmatch(r"Bob <sip:bob@example\.com>;tag=[0-9a-f]{12}", response.header("to") or "")
    assert response.header("cseq") == "4 INVITE"
    assert response.call_id == "folded-1"


def test_response_for_unparsable_sanitizes_the_reason() -> None:
    answer = response_for_unparsable(options(), 400, "Bad\r\nX-Injected: 1")
    assert answer is not None
    assert answer.startswith(b"SIP/2.0 400 Bad  X-Injected: 1\r\nVia: ")
    assert b"\r\nX-Injected" not in answer


def test_response_for_unparsable_ignores_the_body() -> None:
    # Regression: header-like lines in a body (message/sipfrag, text) were read as headers.
    body = b"Via: SIP/2.0/TCP evil;branch=z9hG4bKx\r\nCall-ID: other\r\n"
    raw = options().replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode()) + body
    answer = response_for_unparsable(raw, 400, "Bad Request")
    assert answer is not None
    response = parse(answer)
    assert response.values("via") == ["SIP/2.0/TCP client.example.com:5060;branch=z9hG4bK74bf9"]
    assert response.header_lines("call-id") == ["3848276298220188511@example.com"]
    no_headers_above = b"OPTIONS sip:a@b SIP/2.0\r\n\r\n" + crlf("\n".join(MANDATORY_LINES.values()) + "\n")
    assert response_for_unparsable(no_headers_above, 400, "Bad Request") is None


@pytest.mark.parametrize(
    "block",
    [
        RESPONSE,
        b"SIP/2.0 400 Bad\r\n" + options().split(b"\r\n", 1)[1],
        options(without="via"),
        options(without="from"),
        options(without="to"),
        options(without="call-id"),
        options(without="cseq"),
        options(start="OPTIONS sip:a@b HTTP/1.1"),
        options(start="garbage"),
        b"",
        b"OPTIONS sip:a@b SIP/2.0\r\n",
    ],
)
def test_response_for_unparsable_returns_none(block: bytes) -> None:
    assert response_for_unparsable(block, 400, "Bad Request") is None


def test_response_for_unparsable_on_partial_header_lines() -> None:
    """A header block cut at a line end (too large) still answers when the lines are there."""
    partial = options().split(b"Content-Length")[0]
    answer = response_for_unparsable(partial, 513, "Message Too Large")
    assert answer is not None
    assert answer.startswith(b"SIP/2.0 513 Message Too Large\r\n")
    cut_before_cseq = partial.split(b"CSeq")[0]
    assert response_for_unparsable(cut_before_cseq, 513, "Message Too Large") is None


# -- SipMessage helpers ----------------------------------------------------------------------------


def test_cseq_method_and_call_id_defaults() -> None:
    message = SipMessage("SIP/2.0 200 OK", "", "", 200, "OK", [], b"", {})
    assert message.call_id == ""
    assert message.cseq_method == ""
    assert parse(options().replace(b"CSeq: 2 OPTIONS", b"CSeq: 2   OPTIONS  ")).cseq_method == "OPTIONS"


# -- properties ------------------------------------------------------------------------------------

_LINES = st.sampled_from(
    [
        "INVITE sip:a@b SIP/2.0",
        "SIP/2.0 200 OK",
        "SIP/2.0 ",
        "Via: SIP/2.0/TCP h;branch=z9hG4bK1",
        "v: a, b",
        "From: <sip:a>;tag=1",
        "t: <sip:b>",
        "i: x",
        "CSeq: 1 INVITE",
        " folded",
        "\tfolded",
        ":",
        "X",
        "",
        "Name : value",
        'Contact: "a,<" <sip:x>, <sip:y>',
        "²²²",
        "\udcff",
    ]
)
_SIP_ISH = st.lists(st.one_of(_LINES, st.text(max_size=12)), max_size=12).map(
    lambda lines: "\r\n".join(lines).encode("utf-8", "surrogateescape")
)


def _parse_or_error(raw: bytes) -> SipMessage | SipParseError:
    try:
        message = parse(raw)
    except SipParseError as error:
        assert isinstance(error.detail, str)
        assert isinstance(error.is_request, bool)
        return error
    assert isinstance(message, SipMessage)
    assert message.is_request == (message.status == 0)
    for position, (name, _) in enumerate(message.headers):
        assert position in message.index[name]
    return message


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=300))
def test_parse_arbitrary_bytes_returns_message_or_sip_parse_error(raw: bytes) -> None:
    _parse_or_error(raw)


@PROPERTY_SETTINGS
@given(raw=_SIP_ISH, tail=st.sampled_from([b"", b"\r\n\r\n", b"\r\n\r\nbody"]))
def test_parse_sip_like_text_returns_message_or_sip_parse_error(raw: bytes, tail: bytes) -> None:
    result = _parse_or_error(raw + tail)
    if isinstance(result, SipMessage) and result.is_request:
        # Whatever parsed as a request can be answered, and the answer parses back.
        response = parse(build_response(result, 200, "OK", via_source=("192.0.2.1", 5060)))
        assert response.status == 200
        assert response.call_id == result.call_id
        assert response.header("cseq") == result.header("cseq")
        assert len(response.header_lines("via")) == len(result.header_lines("via"))
        answer = response_for_unparsable(raw + tail, 400, "Bad")
        assert answer is not None
        assert parse(answer).status == 400


@PROPERTY_SETTINGS
@given(
    value=st.text(alphabet=st.sampled_from(list('ab ,"<>\\;=')), max_size=30),
)
def test_split_list_value_never_returns_blank_items(value: str) -> None:
    items = split_list_value(value)
    if "," not in value:
        assert items == [value]
        return
    assert all(item and item == item.strip() and item in value for item in items)
    if not any(char in value for char in '"<>'):
        assert items == [part.strip() for part in value.split(",") if part.strip()]


_DIGIT_LIKE = st.characters(categories=("Nd", "No"), include_characters="0123456789")


@PROPERTY_SETTINGS
@given(code=st.text(alphabet=_DIGIT_LIKE, min_size=1, max_size=4))
def test_status_code_is_three_ascii_digits(code: str) -> None:
    raw = f"SIP/2.0 {code} Reason\r\n\r\n".encode()
    valid = len(code) == 3 and all(char in "0123456789" for char in code) and code[0] != "0"
    if valid:
        assert parse(raw).status == int(code)
    else:
        with pytest.raises(SipParseError) as caught:
            parse(raw)
        assert caught.value.detail == f"invalid status code {code!r}"


def test_ack_is_never_answered_even_when_broken() -> None:
    ack = (
        b"ACK sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bKa\r\nFrom: <sip:a@b>;tag=1\r\n"
        b"To: <sip:b@c>;tag=2\r\nCall-ID: x\r\nCSeq: 1 ACK\r\nContent-Length: zz\r\n\r\n"
    )
    assert response_for_unparsable(ack, 400, "Bad Request") is None


# The fast paths of the header checks (one regular expression for the plain shapes) must never accept a
# value the full walk refuses: drawn from the characters that matter to the grammar.
_GRAMMAR_CHARS = st.sampled_from([*list('SIP/2.0TCLWtcpls :;=<>"\\,?@[]abcdefhrou123456789'), "rport", "sip:", " \t"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_GRAMMAR_CHARS, max_size=24).map("".join))
def test_the_plain_address_fast_path_accepts_only_what_the_full_check_accepts(value: str) -> None:
    if sipsyntax._PLAIN_ADDRESS.fullmatch(value) is not None:
        assert sipsyntax._address_walk(value, "From") is None, value


@settings(max_examples=3000, deadline=None)
@given(st.lists(_GRAMMAR_CHARS, max_size=24).map(lambda parts: "SIP/2.0/TCP " + "".join(parts)))
def test_the_plain_via_fast_path_accepts_only_what_the_full_check_accepts(value: str) -> None:
    if sipsyntax._PLAIN_VIA.fullmatch(value) is not None:
        assert sipsyntax._via_walk(value) is None, value


@given(
    st.lists(
        st.sampled_from(["0", "9", "4294967295", "4294967296", " ", "\t", "INVITE", "ACK", "é", ";"]), max_size=5
    ).map("".join),
    st.sampled_from([None, "INVITE", "ACK"]),
)
def test_the_plain_cseq_fast_path_accepts_only_what_the_full_check_accepts(value: str, method: str | None) -> None:
    plain = sipsyntax._PLAIN_CSEQ.fullmatch(value)
    if plain is not None and int(plain[1]) <= sipsyntax.MAX_CSEQ and (method is None or plain[2] == method):
        assert sipsyntax._cseq_walk(value, method) is None, value
    assert (sipsyntax.cseq_problem(value, method) is None) == (sipsyntax._cseq_walk(value, method) is None), value


@given(st.lists(st.sampled_from([*"<>;,= :@", "sip:a", "tag=1", "x"]), max_size=12).map("".join))
def test_params_start_without_quotes_is_where_the_scanner_finds_it(value: str) -> None:
    assert sip._params_start(value) == sip._scanned_params_start(value), value


def test_usual_header_spellings_read_as_the_general_path_reads_them() -> None:
    for spelling, key in sip._USUAL_NAMES.items():
        general = spelling.rstrip(" \t").lower()
        assert key == sip.COMPACT_FORMS.get(general, general), spelling


def test_the_fast_paths_take_the_common_shapes() -> None:
    assert sipsyntax._PLAIN_VIA.fullmatch("SIP/2.0/TCP 127.0.0.1:5090;branch=z9hG4bK-1-0;rport")
    assert sipsyntax._PLAIN_VIA.fullmatch("SIP/2.0/TLS [::1]:5061;branch=z9hG4bKx;rport=40000;received=::1")
    assert not sipsyntax._PLAIN_VIA.fullmatch("SIP/2.0/TCP h;rport=99999")  # the walk says why
    assert sipsyntax._PLAIN_ADDRESS.fullmatch('"Alice Liddell" <sip:alice@example.com>;tag=9fxced76sl')
    assert sipsyntax._PLAIN_ADDRESS.fullmatch("Bob <sips:bob@biloxi.example.com>")
    assert sipsyntax._PLAIN_ADDRESS.fullmatch("sip:carol@chicago.example.com;tag=1")
    assert not sipsyntax._PLAIN_ADDRESS.fullmatch("sip:carol@chicago.example.com?subject=x")
