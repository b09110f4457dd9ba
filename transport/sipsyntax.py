"""RFC 3261 grammar checks (section 25) on single SIP values: tokens, numbers, ports, URIs, Via, addresses.

Every peer may be hostile, so a value a worker or router acts upon is
checked before it is used: a number is ASCII digits (``str.isdigit``
also accepts ``²`` and Arabic-Indic digits, which ``int`` then refuses
or reads), a port is 1..65535, a Via or From value has the shape the
grammar gives it. The checks return the problem as text (``None`` when
the value is fine) so that :mod:`transport.sip` can turn it into a 400.

They are deliberately lenient where RFC 4475 shows real elements must be:
linear white space around ``/``, ``;``, ``=`` and ``:``, leading zeros,
unknown parameters, any URI scheme.
"""

from __future__ import annotations

import re
from typing import Final

#: ``token`` (RFC 3261 section 25.1): method names, transports, parameter names.
_TOKEN: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
#: A URI scheme (RFC 3986 section 3.1) and its colon.
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:")
#: ``sent-protocol LWS sent-by``; the host is a name, an IPv4 address or an IPv6 reference.
_VIA: Final = re.compile(
    r"SIP\s*/\s*2\.0\s*/\s*(?P<transport>[^\s/;]+)\s+"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._]+)(?:\s*:\s*(?P<port>[^\s;]*))?\s*(?P<params>;.*)?",
    re.DOTALL,
)
#: The common, plainly well-formed shapes of a From, To or Contact value, in one regular expression: a
#: quoted (no escapes) or token display name, ``<uri>``, token parameters; or a bare URI with token
#: parameters. Every value it matches passes :func:`address_problem` (a property test checks it), so a
#: match skips that slower walk; anything else, odd or wrong, still gets the full check and its reason.
_PLAIN_ADDRESS: Final = re.compile(
    r"""(?:(?:"[^"\\\r\n]*"[ \t]*|[A-Za-z0-9\-.!%*_+`'~]+(?:[ \t]+[A-Za-z0-9\-.!%*_+`'~]+)*[ \t]*)?"""
    r"<[A-Za-z][A-Za-z0-9+\-.]*:[^<>\s\"\x00-\x1f\x7f]*>"
    r"|[A-Za-z][A-Za-z0-9+\-.]*:[^;?,\s<>\"\x00-\x1f\x7f]+)"
    r"(?:[ \t]*;[ \t]*[A-Za-z0-9\-.!%*_+`'~]+(?:[ \t]*=[ \t]*[^;,\s\"<>\x00-\x1f\x7f]+)?)*"
)
#: A port 1..65535 as decimal digits without leading zeros (the fast paths' port).
_PORT: Final = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
#: The common, plainly well-formed Via value: like :data:`_PLAIN_ADDRESS`, a match always passes
#: :func:`via_problem` (property-tested) and skips its walk over the parameters.
_PLAIN_VIA: Final = re.compile(
    r"SIP/2\.0/[A-Za-z0-9\-.!%*_+`'~]+ (?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._]+)(?::" + _PORT + r")?"
    r"(?:;(?:(?i:rport)(?:=" + _PORT + r")?(?=;|$)|(?!(?i:rport)(?:[=;]|$))[A-Za-z0-9\-.!%*_+`'~]+(?:=[^;,\s]+)?))*"
)
#: The common CSeq: a number of at most 10 digits, one space, a method token.
_PLAIN_CSEQ: Final = re.compile(r"([0-9]{1,10}) ([A-Za-z0-9\-.!%*_+`'~]+)")
#: ``rfc1123-date`` (RFC 3261 section 20.17): the only Date form SIP allows, always GMT.
_DATE: Final = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"[0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)
#: Digits beyond this are refused before ``int`` sees them (leading zeros are legal, but
#: no SIP number needs 32 digits, and ``int`` on thousands of digits is slow or refused).
MAX_NUMBER_DIGITS: Final = 32
#: The largest port number (16 bits); 0 is not a port a message can name.
MAX_PORT: Final = 65535
#: Max-Forwards is ``1*DIGIT`` and RFC 3261 section 20.22 bounds it to 0..255.
MAX_FORWARDS_LIMIT: Final = 255
#: A CSeq number must fit 32 bits (RFC 3261 section 8.1.1.5; RFC 4475 section 3.1.2.4).
MAX_CSEQ: Final = 2**32 - 1


def is_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


def is_utf8(text: str) -> bool:
    """True unless ``text`` holds bytes that were not UTF-8 (kept as surrogate escapes by the parser)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def number(text: str, maximum: int) -> int | None:
    """``text`` (surrounding white space allowed) as an integer 0..maximum, or None if it is not one."""
    digits = text.strip(" \t")
    if not digits or len(digits) > MAX_NUMBER_DIGITS or not digits.isascii() or not digits.isdigit():
        return None
    value = int(digits)
    return value if value <= maximum else None


def port(text: str) -> int | None:
    """``text`` as a port 1..65535, or None (leading zeros are legal: ``port = 1*DIGIT``)."""
    value = number(text, MAX_PORT)
    return value if value else None


def has_scheme(uri: str) -> bool:
    """True when ``uri`` starts with ``scheme:`` (RFC 3986), the one thing every absolute URI has."""
    return _SCHEME.match(uri) is not None


def request_uri_problem(uri: str) -> str | None:
    """Why a Request-URI is unusable: no scheme (``<sip:...>`` has none), or headers in a SIP URI.

    RFC 3261 section 19.1.5 forbids ``?headers`` in a Request-URI; RFC 4475
    section 3.1.2.11 lets an element answer 400 to one.
    """
    if not has_scheme(uri):
        return f"Request-URI {uri[:60]!r} has no scheme"
    if uri[:4].lower() in ("sip:", "sips") and "?" in uri.rpartition("@")[2]:  # "?" is legal in the user part
        return f"Request-URI {uri[:60]!r} carries headers"
    return None


def via_problem(value: str) -> str | None:
    """Why one Via value is malformed (RFC 3261 section 20.42), or None."""
    if _PLAIN_VIA.fullmatch(value) is not None:
        return None
    return _via_walk(value)


def _via_walk(value: str) -> str | None:
    """:func:`via_problem` the long way: every part of the value, with the reason of the first that fails."""
    match = _VIA.fullmatch(value.strip())
    if match is None or not is_token(match["transport"]):
        return f"malformed Via {value[:60]!r}"
    if match["port"] is not None and port(match["port"]) is None:
        return f"Via port {match['port'][:20]!r} is not 1..{MAX_PORT}"
    for name, param_value in _params(match["params"] or ""):
        if not is_token(name):
            return f"malformed Via parameter {name[:30]!r}"
        if name.lower() == "rport" and param_value is not None and port(param_value) is None:
            return f"Via rport {param_value[:20]!r} is not 1..{MAX_PORT}"
    return None


def address_problem(value: str, header: str) -> str | None:
    """Why a From, To or Contact value is malformed (RFC 3261 section 20.10), or None.

    ``name-addr`` (``"Display" <uri>;params``) or ``addr-spec`` (``uri;params``,
    which cannot contain ``?`` or ``,``: a URI with those must be in angle
    brackets). A display name is a quoted string or tokens; no white space
    inside the brackets.
    """
    if _PLAIN_ADDRESS.fullmatch(value) is not None:
        return None
    return _address_walk(value, header)


def _address_walk(value: str, header: str) -> str | None:
    """:func:`address_problem` the long way, with the reason of the first part that fails."""
    quote_end = _quoted_string_end(value)
    if quote_end < 0:
        return f"unbalanced quotes in {header} {value[:60]!r}"
    rest = value[quote_end:]
    opening = rest.find("<")
    if opening >= 0:
        closing = rest.find(">", opening)
        display = rest[:opening].strip(" \t")
        if closing < 0:
            return f"unclosed '<' in {header} {value[:60]!r}"
        if display and (quote_end or not all(is_token(word) for word in display.split())):
            return f"display name {display[:40]!r} in {header} is neither quoted nor tokens"
        uri = rest[opening + 1 : closing]
        params = rest[closing + 1 :]
        if uri != uri.strip(" \t") or not has_scheme(uri) or _unquotable(uri):
            return f"malformed URI {uri[:60]!r} in {header}"
    else:
        if quote_end:
            return f"display name without '<uri>' in {header} {value[:60]!r}"
        uri, semicolon, params = rest.partition(";")
        params = semicolon + params
        uri = uri.strip(" \t")
        if not has_scheme(uri) or "?" in uri or " " in uri or _unquotable(uri):
            return f"malformed URI {uri[:60]!r} in {header} (one with '?' needs '<...>')"
    if params.strip(" \t") and not params.lstrip(" \t").startswith(";"):
        return f"text after the URI in {header} {value[:60]!r}"
    for name, param_value in _params(params.strip(" \t")):
        if not is_token(name):
            return f"malformed parameter {name[:30]!r} in {header}"
        if param_value is not None and not _plain_or_quoted(param_value):
            return f"malformed value of parameter {name[:30]!r} in {header}"
    return None


def call_id_problem(value: str) -> str | None:
    """Why a Call-ID is malformed (empty, or white space inside: RFC 3261 section 25.1), or None."""
    if not value or " " in value or "\t" in value:
        return f"malformed Call-ID {value[:60]!r}"
    return None


def cseq_problem(value: str, method: str | None) -> str | None:
    """Why a CSeq value is malformed, or None; for a request, its method must match ``method``."""
    plain = _PLAIN_CSEQ.fullmatch(value)
    if plain is not None and int(plain[1]) <= MAX_CSEQ and (method is None or plain[2] == method):
        return None
    return _cseq_walk(value, method)


def _cseq_walk(value: str, method: str | None) -> str | None:
    """:func:`cseq_problem` the long way: white space allowed around the parts, with the reason."""
    sequence, _, cseq_method = value.strip(" \t").partition(" ")
    cseq_method = cseq_method.strip(" \t")
    if number(sequence, MAX_CSEQ) is None or not is_token(cseq_method):
        return f"malformed CSeq {value[:60]!r}"
    if method is not None and cseq_method != method:
        return f"CSeq method {cseq_method[:30]!r} does not match the request method"
    return None


def date_ok(value: str) -> bool:
    return _DATE.fullmatch(value.strip(" \t")) is not None


def _plain_or_quoted(value: str) -> bool:
    """A parameter value is one quoted string, or has no quote at all; never a control character.

    An unbalanced quote would make every later reader of the header (``header_param``, a phone)
    take the rest of it, the ``tag`` an answer adds included, as quoted text.
    """
    if any(char < " " or char == "\x7f" for char in value):
        return False
    if '"' not in value:
        return True
    return _quoted_string_end(value) == len(value) and value.startswith('"')


def _unquotable(uri: str) -> bool:
    """A URI cannot hold a double quote or a control character (RFC 3986 section 2): both would
    change how the rest of the header is read (a quote opens a quoted string for the next reader)."""
    return '"' in uri or any(char < " " or char == "\x7f" for char in uri)


def _params(text: str) -> list[tuple[str, str | None]]:
    """``;name[=value]`` pairs with white space trimmed; an empty name where a parameter is missing."""
    if not text:
        return []
    pairs: list[tuple[str, str | None]] = []
    for part in text.split(";")[1:]:
        name, equals, param_value = part.partition("=")
        pairs.append((name.strip(" \t"), param_value.strip(" \t") if equals else None))
    return pairs


def _quoted_string_end(value: str) -> int:
    """Offset just past a leading quoted string (0 if there is none), or -1 if it never closes."""
    text = value.lstrip(" \t")
    if not text.startswith('"'):
        return 0
    start = len(value) - len(text)
    index = start + 1
    while index < len(value):
        char = value[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            return index + 1
        index += 1
    return -1
