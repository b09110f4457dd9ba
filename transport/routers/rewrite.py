"""The bytes of a forwarded request or a relayed response (RFC 3261 sections 16.6 and 16.7).

A forwarded request gets: its new Request-URI, the proxy's Via on top (the
client's Via gains ``received``/``rport``), the proxy's Record-Route
values above any others, the Route values the proxy consumed removed,
Max-Forwards decremented, and this proxy's own Proxy-Authorization
credentials removed (RFC 3261 section 22.3: those of other realms stay).
Everything else is copied as received, body included.
"""

from __future__ import annotations

from collections.abc import Sequence

from sipwire.transport.routers.digest import parse_credentials
from sipwire.transport.sip import CANONICAL_NAMES, SipMessage, split_list_value
from sipwire.transport.sipresponse import fill_via_received


def forwarded_request(
    message: SipMessage,
    *,
    request_uri: str,
    own_via: str,
    client_via: str,
    routes: Sequence[str],
    record_routes: Sequence[str],
    max_forwards: int,
    realm: str,
) -> bytes:
    """The request as it leaves; ``routes`` are the Route values still to follow, ``realm`` ours ("" for none)."""
    lines = [f"{message.method} {request_uri} SIP/2.0", f"Via: {own_via}"]
    if record_routes:
        lines.append(f"Record-Route: {', '.join(record_routes)}")
    if routes:
        lines.append(f"Route: {', '.join(routes)}")
    top_via_position = message.index["via"][0] if "via" in message.index else -1
    for position, (name, value) in enumerate(message.headers):
        if name in ("max-forwards", "route"):
            continue
        if name == "proxy-authorization" and realm and _is_for_realm(value, realm):
            continue
        if position == top_via_position:
            value = client_via  # noqa: PLW2901 - the top Via gains received/rport
        lines.append(f"{title(name)}: {value}")
    lines.append(f"Max-Forwards: {max_forwards}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + message.body


def with_received(via_line: str, source: tuple[str, int]) -> str:
    """A Via line whose first value gains ``received``/``rport`` (RFC 3261 18.2.1, RFC 3581)."""
    values = split_list_value(via_line)
    values[0] = fill_via_received(values[0], *source)
    return ", ".join(values)


def without_top_via(message: SipMessage) -> bytes:
    """A response as relayed: the proxy's own (top) Via removed, the rest as received."""
    lines = [message.start_line]
    first_via = True
    for name, value in message.headers:
        if name == "via" and first_via:
            first_via = False
            rest = split_list_value(value)[1:]
            if rest:
                lines.append(f"Via: {', '.join(rest)}")
            continue
        lines.append(f"{title(name)}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + message.body


def title(name: str) -> str:
    """How a (lower-case) header name is written out."""
    return CANONICAL_NAMES.get(name) or "-".join(part.capitalize() for part in name.split("-"))


def _is_for_realm(value: str, realm: str) -> bool:
    credentials = parse_credentials(value)
    return credentials is not None and credentials.get("realm").lower() == realm
