"""RFC 4475 "SIP Torture Test Messages" against the framer, the parser and a real transport.

The messages are in ``tests/corpus/rfc4475/`` (see its README). Each has an
expected outcome below, taken from the RFC's section for it, adjusted where
a stream transport decides otherwise (the README says why): how the framer
cuts the file, whether each framed message parses, and what a transport
running the ``responder`` router answers over TCP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sipwire.transport.framing import Framer, FramingError
from sipwire.transport.sip import SipParseError, parse
from tests.conftest import RunningTransport, SipClient, sip_request, write_config

CORPUS = Path(__file__).parent / "corpus" / "rfc4475"
#: A transport gives up on clerr's missing 9849 octets after this many seconds.
MESSAGE_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Vector:
    """What one RFC 4475 message must do here.

    ``parsed``: per framed message, ``ok``, ``request_error`` or ``response_error``.
    ``framing``: the FramingErrorReason raised after those messages, ``incomplete``
    if the framer keeps waiting, empty if the file frames whole.
    ``answers``: the statuses the transport sends back, in order; ``closed``: it
    then closes the connection.
    """

    section: str
    parsed: tuple[str, ...]
    answers: tuple[int, ...]
    framing: str = ""
    closed: bool = False


OK = ("ok",)
BAD_REQUEST = ("request_error",)
BAD_RESPONSE = ("response_error",)

VECTORS: dict[str, Vector] = {
    # 3.1.1 valid messages: never 400; extension methods 501; responses are never answered.
    "wsinv": Vector("3.1.1.1", OK, (200,)),
    "intmeth": Vector("3.1.1.2", OK, (501,)),
    "esc01": Vector("3.1.1.3", OK, (200,)),
    "escnull": Vector("3.1.1.4", OK, (200,)),
    "esc02": Vector("3.1.1.5", OK, (501,)),
    "lwsdisp": Vector("3.1.1.6", OK, (200,)),
    "longreq": Vector("3.1.1.7", OK, (200,)),
    # On a stream the INVITE is the next message, not noise; its body ends 2 octets before the
    # file does, and those ("C" CRLF CRLF) are a header block without Content-Length.
    "dblreq": Vector("3.1.1.8", ("ok", "ok"), (200, 200), "missing_content_length", closed=True),
    "semiuri": Vector("3.1.1.9", OK, (200,)),
    "transports": Vector("3.1.1.10", OK, (200,)),
    "mpart01": Vector("3.1.1.11", OK, (200,)),
    "unreason": Vector("3.1.1.12", OK, ()),
    "noreason": Vector("3.1.1.13", OK, ()),
    # 3.1.2 invalid messages.
    "badinv01": Vector("3.1.2.1", BAD_REQUEST, (400,)),
    "clerr": Vector("3.1.2.2", (), (), "incomplete", closed=True),
    "ncl": Vector("3.1.2.3", (), (400,), "bad_content_length", closed=True),
    "scalar02": Vector("3.1.2.4", BAD_REQUEST, (400,)),
    "scalarlg": Vector("3.1.2.5", BAD_RESPONSE, ()),
    "quotbal": Vector("3.1.2.6", BAD_REQUEST, (400,)),
    "ltgtruri": Vector("3.1.2.7", BAD_REQUEST, (400,)),
    "lwsruri": Vector("3.1.2.8", BAD_REQUEST, (400,)),
    "lwsstart": Vector("3.1.2.9", BAD_REQUEST, (400,)),
    "trws": Vector("3.1.2.10", BAD_REQUEST, (400,)),
    "escruri": Vector("3.1.2.11", BAD_REQUEST, (400,)),
    "baddate": Vector("3.1.2.12", BAD_REQUEST, (400,)),
    "regbadct": Vector("3.1.2.13", BAD_REQUEST, (400,)),
    "badaspec": Vector("3.1.2.14", BAD_REQUEST, (400,)),
    "baddn": Vector("3.1.2.15", BAD_REQUEST, (400,)),
    "badvers": Vector("3.1.2.16", BAD_REQUEST, (505,)),
    "mismatch01": Vector("3.1.2.17", BAD_REQUEST, (400,)),
    "mismatch02": Vector("3.1.2.18", BAD_REQUEST, (400,)),
    "bigcode": Vector("3.1.2.19", BAD_RESPONSE, ()),
    # 3.2 transport layer: the bare magic cookie is a valid (if useless) branch.
    "badbranch": Vector("3.2.1", OK, (200,)),
    # 3.3 application layer.
    "insuf": Vector("3.3.1", BAD_REQUEST, (), closed=True),  # no From/To/Call-ID: no response can be built
    "unkscm": Vector("3.3.2", OK, (416,)),
    "novelsc": Vector("3.3.3", OK, (416,)),
    "unksm2": Vector("3.3.4", OK, (416,)),
    "bext01": Vector("3.3.5", OK, (420,)),
    "invut": Vector("3.3.6", OK, (415,)),
    "regaut01": Vector("3.3.7", OK, (200,)),  # the responder authenticates nobody
    "multi01": Vector("3.3.8", BAD_REQUEST, (400,)),
    "mcl01": Vector("3.3.9", (), (400,), "duplicate_content_length", closed=True),
    "bcast": Vector("3.3.10", OK, ()),
    "zeromf": Vector("3.3.11", OK, (200,)),  # an endpoint, not a proxy: Max-Forwards 0 is fine
    "cparam01": Vector("3.3.12", OK, (200,)),
    "cparam02": Vector("3.3.13", OK, (200,)),
    "regescrt": Vector("3.3.14", OK, (200,)),
    "sdp01": Vector("3.3.15", OK, (406,)),
    # 3.4 backward compatibility: RFC 2543 allowed no Content-Length; a stream cannot frame without one.
    "inv2543": Vector("3.4.1", (), (400,), "missing_content_length", closed=True),
}


def test_every_file_has_an_expectation() -> None:
    assert sorted(path.stem for path in CORPUS.glob("*.sip")) == sorted(VECTORS)


def _frames(data: bytes) -> tuple[list[bytes], str]:
    """The messages the framer cuts from ``data`` and how it ends ("" / reason / "incomplete")."""
    framer = Framer()
    try:
        events = framer.feed(data)
    except FramingError as error:
        return [event for event in error.events if isinstance(event, bytes)], error.reason.value
    messages = [event for event in events if isinstance(event, bytes)]
    return messages, "incomplete" if framer.in_message else ""


def _parse_outcome(raw: bytes) -> str:
    try:
        parse(raw)
    except SipParseError as error:
        return "request_error" if error.is_request else "response_error"
    return "ok"


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_framing_and_parsing(name: str) -> None:
    vector = VECTORS[name]
    data = (CORPUS / f"{name}.sip").read_bytes()
    messages, ending = _frames(data)
    assert ending == vector.framing
    assert tuple(_parse_outcome(message) for message in messages) == vector.parsed
    if not vector.framing:
        assert b"".join(messages) == data


def _exchange(running: RunningTransport, name: str) -> None:
    """Send one vector on its own connection; check the answers, then that the connection is closed or still serves."""
    vector = VECTORS[name]
    with SipClient.connect(running) as client:
        client.send((CORPUS / f"{name}.sip").read_bytes())
        answers = [client.read_response(timeout=MESSAGE_TIMEOUT_SECONDS + 4).status for _ in vector.answers]
        assert tuple(answers) == vector.answers, name
        if vector.closed:
            assert client.read_until_closed(timeout=MESSAGE_TIMEOUT_SECONDS + 4) == b"", name
            return
        client.send(sip_request("OPTIONS", 1, call_id=f"after-{name}"))
        after = client.read_response()
        assert (after.status, after.all("call-id")) == (200, [f"after-{name}"]), name


def test_every_vector_over_tcp_then_a_good_client_is_served(start_transport: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, message_timeout=MESSAGE_TIMEOUT_SECONDS)
    running = start_transport("--config", str(config), workers=2)
    for name in sorted(VECTORS):
        _exchange(running, name)
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1, call_id="good-client"))
        assert client.read_response().status == 200
    counters = running.counters()
    assert counters["framing_error.message_timeout"] == 1  # clerr
    assert counters["framing_error.bad_content_length"] == 1  # ncl
    assert counters["framing_error.duplicate_content_length"] == 1  # mcl01
    assert counters["framing_error.missing_content_length"] == 2  # dblreq's trailing octets, inv2543
    answered = [v for v in VECTORS.values() if v.parsed == BAD_REQUEST and v.answers]
    assert counters["sip_parse_error.answered"] == len(answered)
    assert counters["sip_parse_error.closed"] == 1  # insuf
    assert counters["sip_parse_error.response_dropped"] == 2  # scalarlg, bigcode
    assert counters.get("router_errors", 0) == 0
