"""Sans-IO SIP message parser used by the workers (responses are built in :mod:`transport.sipresponse`).

The transport only frames messages; this module does the full parse of the
start line and headers (RFC 3261 sections 7 and 25): header names are
case-insensitive and may use compact forms, values may be folded over
continuation lines, and list headers (Via, Contact, Route...) may carry
several comma-separated values in one line or repeat on several lines.

It is written for speed, since SIP text handling is the largest Python cost
on the worker side: one split of the header block, one dict of canonical
names (the usual spellings found with one lookup), and the grammar checks of
:mod:`transport.sipsyntax` passing plain values with one regular expression
each. ``bench/workerbench.py`` measures what a message costs a worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from sipwire.errors import ProtocolError
from sipwire.transport import sipsyntax

SIP_VERSION: Final = "SIP/2.0"

#: Compact header forms (RFC 3261 section 7.3.3 and later RFCs' registrations).
COMPACT_FORMS: Final[dict[str, str]] = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

#: Headers whose grammar allows a comma-separated list of values.
LIST_HEADERS: Final = frozenset(
    {
        "via",
        "contact",
        "route",
        "record-route",
        "path",
        "allow",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "allow-events",
        "content-encoding",
        "in-reply-to",
    }
)

#: Canonical spelling used when this module writes a header line.
CANONICAL_NAMES: Final[dict[str, str]] = {
    "via": "Via",
    "from": "From",
    "to": "To",
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "contact": "Contact",
    "content-length": "Content-Length",
    "content-type": "Content-Type",
    "record-route": "Record-Route",
    "max-forwards": "Max-Forwards",
    "www-authenticate": "WWW-Authenticate",
}

#: Header names as phones and proxies usually spell them, to their canonical key: parse() reads them with
#: one lookup; any other spelling takes the general path (strip, lower case, compact form).
_USUAL_NAMES: Final[dict[str, str]] = {
    spelling: COMPACT_FORMS.get(spelling.lower(), spelling.lower())
    for name in (
        "Via",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Contact",
        "Max-Forwards",
        "Content-Length",
        "Content-Type",
        "User-Agent",
        "Server",
        "Allow",
        "Accept",
        "Supported",
        "Require",
        "Expires",
        "Route",
        "Record-Route",
        "Authorization",
        "Proxy-Authorization",
        "WWW-Authenticate",
        "Proxy-Authenticate",
        "Event",
        "Subject",
        "Date",
        "Path",
        "Allow-Events",
        "Session-Expires",
        "Min-SE",
        "Timestamp",
        "Organization",
        "Reason",
        "Subscription-State",
        "P-Asserted-Identity",
        "Refer-To",
        "Referred-By",
        "Replaces",
        "RAck",
        "RSeq",
        "Call-Id",
        "Cseq",
        "Content-length",
        "Max-forwards",
        "User-agent",
        "Record-route",
        *COMPACT_FORMS,
    )
    for spelling in (name, name.lower(), name.upper())
}

#: Headers a request must carry to be answered at all (RFC 3261 section 8.1.1).
MANDATORY_REQUEST_HEADERS: Final = ("via", "from", "to", "call-id", "cseq")

#: Headers that may appear once only (RFC 3261 section 7.3.1; RFC 4475 section 3.3.8).
SINGLE_HEADERS: Final = ("from", "to", "call-id", "cseq", "max-forwards")

#: What the header scanners stop at: a quoted string, escapes included (skipped whole, to the end of the text
#: when it never closes), or a delimiter outside one. One pass in ``re`` instead of a loop per character.
_DELIMITERS: Final = re.compile(r'"(?:[^"\\]|\\.)*"?|[<>,;]', re.DOTALL)

#: A SIP-Version of another number (``SIP/7.0``) is answered 505, anything else 400.
_OTHER_SIP_VERSION: Final = re.compile(r"SIP/[0-9]+\.[0-9]+")


#: Reason phrases of the statuses a parse error is answered with.
PARSE_ERROR_REASONS: Final = {400: "Bad Request", 505: "Version Not Supported"}


class SipParseError(ProtocolError):
    """A message is not valid SIP; ``start_line`` helps decide whether to answer, ``status`` with what."""

    def __init__(self, detail: str, start_line: str = "", status: int = 400) -> None:
        super().__init__(detail)
        self.detail = detail
        self.start_line = start_line
        self.status = status

    @property
    def reason_phrase(self) -> str:
        return PARSE_ERROR_REASONS[self.status]

    @property
    def is_request(self) -> bool:
        """True when the broken message looks like a request (worth a 400)."""
        return bool(self.start_line) and not self.start_line.startswith("SIP/")


@dataclass(slots=True)
class SipMessage:
    """A parsed request or response.

    ``headers`` keeps every header line in order as (lower-case full name,
    value); ``index`` maps each name to the positions of its lines.
    """

    start_line: str
    method: str
    uri: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    index: dict[str, list[int]] = field(repr=False)

    @property
    def is_request(self) -> bool:
        return self.status == 0

    def header(self, name: str) -> str | None:
        """First value of a header, or None. ``name`` is case-insensitive."""
        positions = self.index.get(name) or self.index.get(canonical_key(name))  # canonical names: one lookup
        return self.headers[positions[0]][1] if positions else None

    def header_lines(self, name: str) -> list[str]:
        """Every line of a header, as written (list values not split)."""
        positions = self.index.get(name) or self.index.get(canonical_key(name)) or ()
        return [self.headers[i][1] for i in positions]

    def values(self, name: str) -> list[str]:
        """All values of a header; lines of list headers (Via, Contact...) are split at top-level commas.

        Other headers (Date, WWW-Authenticate...) may contain commas that do
        not separate values, so their lines are returned whole.
        """
        lines = self.header_lines(name)
        if canonical_key(name) not in LIST_HEADERS:
            return lines
        values: list[str] = []
        for line in lines:
            values.extend(split_list_value(line))
        return values

    @property
    def call_id(self) -> str:
        return self.header("call-id") or ""

    @property
    def cseq_method(self) -> str:
        cseq = self.header("cseq") or ""
        _, _, method = cseq.partition(" ")
        return method.strip()


def canonical_key(name: str) -> str:
    """The parse index's key of a header name: lower case, compact forms expanded."""
    key = name.lower()
    return COMPACT_FORMS.get(key, key)


def parse(raw: bytes) -> SipMessage:
    """Parse one framed message; raise :class:`SipParseError` if it is not SIP."""
    header_end = raw.find(b"\r\n\r\n")
    if header_end < 0:
        raise SipParseError("no CRLFCRLF after the header block")
    head = raw[:header_end].decode("utf-8", "surrogateescape")
    body = raw[header_end + 4 :]
    lines = head.split("\r\n")
    start_line = lines[0]
    method, uri, status, reason = _parse_start_line(start_line)
    if head.count("\r") != len(lines) - 1 or head.count("\n") != len(lines) - 1:
        # RFC 3261 section 7.3.1: lines end in CRLF and no value holds CR or LF; a next hop that ends lines at a
        # bare one would read headers (a second Content-Length) that this parse and the framer did not.
        raise SipParseError("bare CR or LF in the header block", start_line)
    headers: list[tuple[str, str]] = []
    index: dict[str, list[int]] = {}
    for line in lines[1:]:
        first = line[:1]
        if first in {" ", "\t"}:
            if not headers:
                raise SipParseError("continuation line before the first header", start_line)
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise SipParseError(f"header line without a colon: {line[:60]!r}", start_line)
        key = _USUAL_NAMES.get(name)
        if key is None:
            key = name.rstrip(" \t").lower()
            if not key or " " in key or "\t" in key:
                raise SipParseError(f"invalid header name {name[:40]!r}", start_line)
            key = COMPACT_FORMS.get(key, key)
        positions = index.get(key)
        if positions is None:
            index[key] = [len(headers)]
        else:
            positions.append(len(headers))
        headers.append((key, value.strip()))
    if not status:
        for mandatory in MANDATORY_REQUEST_HEADERS:
            if mandatory not in index:
                raise SipParseError(f"missing mandatory header {CANONICAL_NAMES.get(mandatory, mandatory)}", start_line)
    problem = _header_problem(headers, index, method or None, len(body))
    if problem is not None:
        raise SipParseError(problem, start_line)
    return SipMessage(start_line, method, uri, status, reason, headers, body, index)


def _header_problem(
    headers: list[tuple[str, str]], index: dict[str, list[int]], method: str | None, body_length: int
) -> str | None:
    """The first header value the grammar refuses, among those SIP elements act upon; None if all are fine.

    Works on the parse's own header list and index (canonical names): this runs for every message.
    ``method`` is the request's, None for a response; ``body_length`` what the framer cut after the headers.
    """
    for name in SINGLE_HEADERS:
        positions = index.get(name)
        if positions is not None and len(positions) > 1:
            return f"more than one {CANONICAL_NAMES[name]} header"
    for position in index.get("via", ()):
        vias = split_list_value(headers[position][1])
        if not any(vias):  # "" or only commas: no hop to answer through
            return "Via header without a value"
        for via in vias:
            if (problem := sipsyntax.via_problem(via)) is not None:
                return problem
    for name in ("from", "to"):
        positions = index.get(name)
        if positions is not None:
            problem = sipsyntax.address_problem(headers[positions[0]][1], CANONICAL_NAMES[name])
            if problem is not None:
                return problem
    for position in index.get("contact", ()):
        for contact in split_list_value(headers[position][1]):
            if contact != "*" and (problem := sipsyntax.address_problem(contact, "Contact")) is not None:
                return problem
    positions = index.get("cseq")
    if positions is not None and (problem := sipsyntax.cseq_problem(headers[positions[0]][1], method)) is not None:
        return problem
    positions = index.get("max-forwards")
    if positions is not None:
        max_forwards = headers[positions[0]][1]
        if sipsyntax.number(max_forwards, sipsyntax.MAX_FORWARDS_LIMIT) is None:
            return f"Max-Forwards {max_forwards[:20]!r} is not 0..{sipsyntax.MAX_FORWARDS_LIMIT}"
    positions = index.get("call-id")
    if positions is not None and (problem := sipsyntax.call_id_problem(headers[positions[0]][1])) is not None:
        return problem
    positions = index.get("content-length")
    if positions is not None and sipsyntax.number(headers[positions[0]][1], sipsyntax.MAX_CSEQ) != body_length:
        # The framer reads the first line only: folded ("0" CRLF " 25"), a proxy would copy on text no next hop
        # frames as this one did.
        return f"Content-Length {headers[positions[0]][1][:20]!r} is not the body's {body_length} bytes"
    positions = index.get("date")
    if positions is not None and not sipsyntax.date_ok(headers[positions[0]][1]):
        return f"Date {headers[positions[0]][1][:40]!r} is not an RFC 1123 date in GMT"
    return None


def _parse_start_line(line: str) -> tuple[str, str, int, str]:
    """Split ``Method SP Request-URI SP SIP-Version`` or ``SIP-Version SP Status-Code SP Reason-Phrase``.

    Methods are any token, case-sensitive (RFC 3261 section 7.1): ``invite``
    and ``NEWMETHOD`` are extension methods, for the router to answer 501/405.
    """
    parts = line.split(" ", 2)
    if len(parts) < 3:
        raise SipParseError(f"malformed start line {line[:80]!r}", line)
    if parts[0] == SIP_VERSION:
        code = parts[1]
        if len(code) != 3 or not code.isascii() or not code.isdigit() or not "1" <= code[0] <= "6":
            raise SipParseError(f"invalid status code {code!r}", line)
        return "", "", int(code), parts[2]
    method, uri, version = parts
    if not uri or " " in version:
        # RFC 4475 sections 3.1.2.8-10: exactly one SP between the three parts, none after.
        raise SipParseError(f"malformed request line {line[:80]!r}: one space between its three parts", line)
    if version != SIP_VERSION:
        status = 505 if _OTHER_SIP_VERSION.fullmatch(version) else 400
        raise SipParseError(f"unsupported protocol version {version[:20]!r}", line, status)
    if not sipsyntax.is_token(method):
        raise SipParseError(f"invalid method {method[:20]!r}", line)
    problem = sipsyntax.request_uri_problem(uri)
    if problem is not None:
        raise SipParseError(problem, line)
    return method, uri, 0, ""


def split_list_value(value: str) -> list[str]:
    """Split a list header value at commas outside quotes and angle brackets."""
    if "," not in value:
        return [value]
    items: list[str] = []
    depth = 0
    start = 0
    for match in _DELIMITERS.finditer(value):
        char = match.group()
        if char == "<":
            depth += 1
        elif char == ">":
            depth = max(depth - 1, 0)  # a stray ">" must not hide the commas after it
        elif char == "," and depth == 0:
            items.append(value[start : match.start()].strip())
            start = match.end()
    items.append(value[start:].strip())
    return [item for item in items if item]


def header_param(value: str, name: str) -> str | None:
    """Value of a ``;name=value`` parameter outside any ``<...>`` URI (``""`` for a flag).

    The parameters start after the name-addr's closing ``>``, found by scanning
    from its opening ``<`` outside quotes: a parameter may itself quote a
    bracketed value (``+sip.instance="<urn:uuid:...>"``), so the last ``>`` of
    the line is not the end of the URI. Quoted values are returned with their quotes.
    """
    wanted = name.lower()
    if wanted not in value.lower():
        return None  # the common answer, without scanning the value
    for key, param_value in header_params(value):
        if key == wanted:
            return param_value
    return None


def header_params(value: str) -> list[tuple[str, str]]:
    """Every ``;name=value`` parameter after the URI of a header value, names lower-cased, in order."""
    start = _params_start(value)
    params: list[tuple[str, str]] = []
    for part in _split_outside_quotes(value[start:], ";")[1:]:
        key, _, param_value = part.partition("=")
        if key.strip():
            params.append((key.strip().lower(), param_value.strip()))
    return params


def _params_start(value: str) -> int:
    """Where the parameters of a header value begin: after the name-addr's ``>``, else at the start."""
    if '"' not in value:  # nothing quoted: the first ``<`` or ``;`` decides, found without the scanner
        semicolon = value.find(";")
        opening = value.find("<", 0, semicolon) if semicolon >= 0 else value.find("<")
        if opening >= 0:
            closing = value.find(">", opening)
            return len(value) if closing < 0 else closing + 1
        return len(value) if semicolon < 0 else semicolon
    return _scanned_params_start(value)


def _scanned_params_start(value: str) -> int:
    """:func:`_params_start` for any value: quoted strings skipped whole (they may hold ``<`` and ``;``)."""
    for match in _DELIMITERS.finditer(value):
        char = match.group()
        if char == "<":
            closing = value.find(">", match.start())
            return len(value) if closing < 0 else closing + 1
        if char == ";":
            return match.start()  # an addr-spec (no brackets): its parameters start here
    return len(value)


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    """Split ``text`` at ``separator`` characters (``;`` or ``,``) that are not inside a quoted string."""
    if '"' not in text:
        return text.split(separator)
    parts: list[str] = []
    start = 0
    for match in _DELIMITERS.finditer(text):
        if match.group() == separator:
            parts.append(text[start : match.start()])
            start = match.end()
    parts.append(text[start:])
    return parts
