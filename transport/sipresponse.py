"""SIP responses built by the workers and the transport: tags, Via ``received``/``rport``, copied headers.

:func:`build_response` answers a parsed request (RFC 3261 section 8.2.6.2);
:func:`response_for_unparsable` answers one that could not be parsed, from
the header lines it could read, so that a broken request still gets its 400
when its transaction can be named.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable, Sequence

from sipwire.transport.sip import (
    CANONICAL_NAMES,
    MANDATORY_REQUEST_HEADERS,
    SIP_VERSION,
    SipMessage,
    canonical_key,
    header_param,
    split_list_value,
)

_tag_random = random.Random(secrets.randbits(128))


def new_tag() -> str:
    """A fresh From/To tag: 48 random bits (RFC 3261 section 19.3 asks for at least 32).

    Drawn from a generator seeded once from the OS: tags must be unique and
    unpredictable enough for dialog matching, not secret, and reading
    ``os.urandom`` for every response costs measurable time in the workers.
    """
    return f"{_tag_random.getrandbits(48):012x}"


def fill_via_received(via: str, source_host: str, source_port: int) -> str:
    """Add ``received`` and fill ``rport`` on one Via value (RFC 3261 18.2.1, RFC 3581).

    ``received`` is added when the sent-by host differs from the source
    address, and always when the client asked for ``rport``.
    """
    sent_by, _, params = via.partition(";")
    host = sent_by.split()[-1] if sent_by.strip() else ""
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    lowered = params.lower()
    if "rport" not in lowered and "received" not in lowered:  # nothing to fill or replace: the value as it is
        return via if host == source_host else f"{via};received={source_host}"
    out = [sent_by]
    wants_rport = False
    for part in params.split(";"):
        key = part.partition("=")[0].strip().lower()
        if key == "rport":
            wants_rport = True
            out.append(f"rport={source_port}")
        elif key != "received":
            out.append(part)
    if wants_rport or host != source_host:
        out.append(f"received={source_host}")
    return ";".join(out)


def build_response(
    request: SipMessage,
    status: int,
    reason: str,
    *,
    to_tag: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    via_source: tuple[str, int] | None = None,
) -> bytes:
    """Build a response that copies Via, From, To, Call-ID and CSeq (RFC 3261 8.2.6.2).

    A To tag is added for final and provisional-with-dialog responses when
    the request had none (pass ``to_tag`` to keep one tag per dialog).
    ``via_source`` is the request's source address, used to fill the top
    Via's ``received``/``rport``.
    """
    vias = request.header_lines("via")  # a list of its own: the top one may be replaced
    if vias and via_source is not None:
        top = vias[0]
        if "," in top:  # several values on the top line: only the first is ours to fill
            first, *rest = split_list_value(top) or [""]
            vias[0] = ", ".join([fill_via_received(first, *via_source), *rest])
        else:
            vias[0] = fill_via_received(top, *via_source)
    to = request.header("to") or ""
    if status > 100 and header_param(to, "tag") is None:
        to = f"{to};tag={to_tag or new_tag()}"
    via_block = "".join([f"Via: {via}\r\n" for via in vias])
    extra_block = "".join([f"{name}: {_one_line(value)}\r\n" for name, value in extra_headers])
    text = (
        f"{SIP_VERSION} {status} {_one_line(reason)}\r\n{via_block}"
        f"From: {request.header('from') or ''}\r\nTo: {to}\r\n"
        f"Call-ID: {request.header('call-id') or ''}\r\nCSeq: {request.header('cseq') or ''}\r\n"
        f"{extra_block}Content-Length: {len(body)}\r\n\r\n"
    )
    return text.encode("utf-8", "surrogateescape") + body


def response_for_unparsable(
    header_block: bytes, status: int, reason: str, extra_headers: Sequence[tuple[str, str]] = ()
) -> bytes | None:
    """Best-effort error answer for a request the worker or framer could not handle.

    Used where the message cannot be fully parsed (a framing error, a bad
    header): if the header lines read so far name the request's Via, From,
    To, Call-ID and CSeq, answer with ``status``, those headers copied as the
    request had them (RFC 4475 wants the 400 even when one of them is what is
    malformed); otherwise return None and the caller just closes or drops.
    """
    text = header_block.split(b"\r\n\r\n", 1)[0].decode("utf-8", "surrogateescape")
    lines = text.split("\r\n")
    if not lines or lines[0].startswith(("SIP/", "ACK ")) or " SIP/" not in lines[0]:
        # Responses are never answered, and neither is ACK (RFC 3261 section 17.1.1.1).
        return None
    wanted: dict[str, list[str]] = {}
    current: list[str] | None = None  # values of the wanted header the last line belonged to
    for line in lines[1:]:
        if line[:1] in {" ", "\t"}:  # folded continuation of the previous line
            if current is not None:
                current[-1] = f"{current[-1]} {line.strip()}".strip()
            continue
        current = None
        name, colon, value = line.partition(":")
        if not colon:
            continue
        key = canonical_key(name.strip())
        if key == "via" or (key in MANDATORY_REQUEST_HEADERS and key not in wanted):
            # Every Via, but one From/To/Call-ID/CSeq even where a broken request repeats them.
            current = wanted.setdefault(key, [])
            current.append(value.strip())
    if any(key not in wanted for key in MANDATORY_REQUEST_HEADERS):
        return None
    headers = [(CANONICAL_NAMES.get(key, key), value) for key in MANDATORY_REQUEST_HEADERS for value in wanted[key]]
    out = [f"{SIP_VERSION} {status} {_one_line(reason)}"]
    for name, value in headers:
        tag = f";tag={new_tag()}" if name == "To" and header_param(value, "tag") is None else ""
        out.append(f"{name}: {value}{tag}")
    out.extend(f"{name}: {value}" for name, value in extra_headers)
    out.append("Content-Length: 0")
    return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def _one_line(text: str) -> str:
    """Keep caller-supplied text from breaking the message into extra lines."""
    return text.replace("\r", " ").replace("\n", " ")
