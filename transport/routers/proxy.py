"""The ``proxy`` router: a stateless proxy (RFC 3261 section 16.11) with a registrar.

Requests:
  * REGISTER is handled locally: the bindings of the To address-of-record
    are stored with the id of the connection they came on, so requests for
    that user go back over the client's own connection (the flow, as in
    RFC 5626), which is the only way to reach a client behind NAT.
  * Other requests go to the contact registered for their Request-URI, or
    else to ``--upstream``. The proxy adds its own Via whose branch is
    derived from the incoming one (stateless: a retransmission gets the
    same branch) and which carries a *flow token*: the id of the incoming
    connection and an HMAC, under a per-instance key, over the branch, that
    id and the address a response falls back to (see below).
  * A forward that fails (the transport reports refused, timeout, reset...)
    is answered 503, or 480 when a registered flow is gone: that is what
    write-job outcomes are for.

Responses: only a response whose top Via carries a flow token this
instance made is relayed; anything else is dropped and logged (a peer
could otherwise inject messages into other users' connections, whose ids
are sequential, or make the transport connect anywhere). The proxy's Via
is removed and the response is sent on the connection named in the
token; if that connection is gone, to the next Via's ``received`` address
and sent-by port (RFC 3261 section 18.2.2), which the token also covers.

The registrar lives in SQLite under the instance's state directory so
that every worker of the unified pool sees the same bindings.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import sqlite3
import time
from typing import Final

from sipwire.config import Settings
from sipwire.statedir import instance_secret, runtime_directory
from sipwire.transport import sipsyntax
from sipwire.transport.ratelog import RateLimitedLog
from sipwire.transport.routing import Destination, Envelope, Outcome, RouteContext
from sipwire.transport.sip import (
    CANONICAL_NAMES,
    SipMessage,
    build_response,
    fill_via_received,
    header_param,
    split_list_value,
)
from sipwire.transport.sipuri import SipUriError, parse_uri, uri_of

#: The Via parameter of the proxy's flow token: ``<connection id>.<HMAC-SHA256, first 16 bytes, hex>``.
FLOW_PARAM: Final = "swf"
#: File of the per-instance key of the flow tokens, in the runtime directory (0600, shared by the workers).
FLOW_KEY_FILE: Final = "proxy-flow.key"
#: HMAC bytes kept in a token: 128 bits cannot be guessed, and keep the Via short.
FLOW_MAC_BYTES: Final = 16
#: Connection ids are 64-bit (the WRITE record's conn id field).
MAX_CONN_ID: Final = 2**64 - 1

log = logging.getLogger("sipwire.proxy")
DEFAULT_EXPIRES: Final = 3600
#: What a forwarded request without Max-Forwards starts from (RFC 3261 section 8.1.1.6).
DEFAULT_MAX_FORWARDS: Final = 70
MAX_EXPIRES: Final = 86400


class _State:
    """Per-worker router state, built by :func:`setup`."""

    def __init__(self, settings: Settings) -> None:
        self.upstream: Destination | None = None
        if settings.upstream:
            uri = parse_uri(settings.upstream)
            self.upstream = Destination(uri.transport, uri.host, uri.default_port())
        directory = runtime_directory(settings)
        self.flow_key = instance_secret(directory, FLOW_KEY_FILE)
        self.ratelog = RateLimitedLog(log)
        self.db = sqlite3.connect(directory / "registrar.sqlite3", timeout=2.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS bindings (aor TEXT, contact TEXT, conn_id INTEGER, expires REAL,"
            " PRIMARY KEY (aor, contact))"
        )


_state: _State | None = None


def setup(settings: Settings) -> None:
    """Called once per worker before the first message."""
    global _state  # noqa: PLW0603 - one router state per worker process, set once at start
    _state = _State(settings)


def route(message: SipMessage, ctx: RouteContext) -> None:
    if _state is None:
        raise RuntimeError("proxy router used without setup(); load it with --router proxy")
    if not message.is_request:
        _relay_response(_state, message, ctx)
    elif message.method == "REGISTER":
        _register(_state, message, ctx)
    else:
        _forward(_state, message, ctx)


def _register(state: _State, message: SipMessage, ctx: RouteContext) -> None:
    try:
        aor = parse_uri(uri_of(message.header("to") or "")).address_of_record
    except SipUriError as error:
        ctx.reply(build_response(message, 400, f"Bad Request ({error})", via_source=ctx.envelope.remote))
        return
    default_expires = _expires(message.header("expires"), DEFAULT_EXPIRES)
    now = time.time()
    for contact in message.values("contact"):
        if contact == "*":
            state.db.execute("DELETE FROM bindings WHERE aor = ?", (aor,))
            continue
        expires = _expires(header_param(contact, "expires"), default_expires)
        contact_uri = uri_of(contact)
        if expires == 0:
            state.db.execute("DELETE FROM bindings WHERE aor = ? AND contact = ?", (aor, contact_uri))
        else:
            state.db.execute(
                "INSERT OR REPLACE INTO bindings VALUES (?, ?, ?, ?)",
                (aor, contact_uri, ctx.envelope.conn_id, now + expires),
            )
    rows = state.db.execute(
        "SELECT contact, expires FROM bindings WHERE aor = ? AND expires > ?", (aor, now)
    ).fetchall()
    contacts = [("Contact", f"<{contact}>;expires={int(expires - now)}") for contact, expires in rows]
    ctx.reply(build_response(message, 200, "OK", extra_headers=contacts, via_source=ctx.envelope.remote))


def _expires(value: str | None, default: int) -> int:
    """An Expires value capped at a day; the default when absent or not a number (RFC 4475 section 3.1.2.4)."""
    seconds = None if value is None else sipsyntax.number(value, sipsyntax.MAX_CSEQ)
    return default if seconds is None else min(seconds, MAX_EXPIRES)


def _forward(state: _State, message: SipMessage, ctx: RouteContext) -> None:
    envelope = ctx.envelope
    max_forwards = message.header("max-forwards")  # sip.parse refuses a value that is not 0..255
    hops = sipsyntax.number(max_forwards or "", sipsyntax.MAX_FORWARDS_LIMIT)
    if hops is None:
        hops = DEFAULT_MAX_FORWARDS
    if hops <= 0:
        if message.method != "ACK":
            ctx.reply(build_response(message, 483, "Too Many Hops", via_source=envelope.remote))
        return
    target_conn, destination = _target(state, message)
    if target_conn is None and destination is None:
        if message.method != "ACK":
            ctx.reply(
                build_response(message, 404, "Not Found (no binding and no upstream)", via_source=envelope.remote)
            )
        return
    data = _forwarded_bytes(state.flow_key, message, envelope, hops - 1)

    def on_outcome(outcome: Outcome) -> None:
        if outcome.ok or message.method == "ACK":
            return
        status, reason = (480, "Temporarily Unavailable") if target_conn else (503, "Service Unavailable")
        ctx.reply(build_response(message, status, f"{reason} ({outcome.result.label})", via_source=envelope.remote))

    if target_conn is not None:
        ctx.send_on(target_conn, data, on_outcome)
    elif destination is not None:
        ctx.send(destination, data, on_outcome)


def _target(state: _State, message: SipMessage) -> tuple[int | None, Destination | None]:
    """A registered flow for the Request-URI, else the upstream."""
    try:
        aor = parse_uri(message.uri).address_of_record
    except SipUriError:
        return None, state.upstream
    row = state.db.execute(
        "SELECT conn_id FROM bindings WHERE aor = ? AND expires > ? ORDER BY expires DESC LIMIT 1",
        (aor, time.time()),
    ).fetchone()
    if row is not None:
        return int(row[0]), None
    return None, state.upstream


def _forwarded_bytes(key: bytes, message: SipMessage, envelope: Envelope, max_forwards: int) -> bytes:
    conn_id = envelope.conn_id
    top_via = message.header_lines("via")[0] if message.header_lines("via") else ""
    branch = hashlib.sha1(f"{top_via}|{conn_id}|{message.uri}".encode(), usedforsecurity=False).hexdigest()[:20]
    client_via = _with_received(top_via, envelope.remote) if top_via else ""
    token = _flow_token(key, f"z9hG4bK{branch}", conn_id, _fallback_of(client_via))
    local_host, local_port = envelope.local
    host = f"[{local_host}]" if ":" in local_host else local_host
    own_via = f"SIP/2.0/{envelope.transport.upper()} {host}:{local_port};branch=z9hG4bK{branch};{FLOW_PARAM}={token}"
    lines = [message.start_line, f"Via: {own_via}"]
    for position, (name, value) in enumerate(message.headers):
        if name == "max-forwards":
            continue
        if name == "via" and position == message.index["via"][0]:
            value = client_via  # noqa: PLW2901 - the top Via gains received/rport
        lines.append(f"{_title(name)}: {value}")
    lines.append(f"Max-Forwards: {max_forwards}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + message.body


def _with_received(via_line: str, source: tuple[str, int]) -> str:
    values = split_list_value(via_line)
    values[0] = fill_via_received(values[0], *source)
    return ", ".join(values)


def _title(name: str) -> str:
    return CANONICAL_NAMES.get(name) or "-".join(part.capitalize() for part in name.split("-"))


def _relay_response(state: _State, message: SipMessage, ctx: RouteContext) -> None:
    vias = message.values("via")
    flow = _verified_flow(state.flow_key, vias) if len(vias) >= 2 else None
    if flow is None:
        state.ratelog.log(
            logging.WARNING, "unverified_response",
            "dropped a response from %s:%d: its top Via carries no flow token of this proxy (%.80r)",
            *ctx.envelope.remote, vias[0] if vias else "no Via",
        )  # fmt: skip
        return
    conn_id, fallback = flow
    data = _without_top_via(message)

    def on_outcome(outcome: Outcome) -> None:
        if not outcome.ok and fallback is not None:
            ctx.send(fallback, data)

    ctx.send_on(conn_id, data, on_outcome)


def _flow_token(key: bytes, branch: str, conn_id: int, fallback: Destination | None) -> str:
    """``<conn id>.<mac>``: the MAC binds the id to this branch and to the fallback address."""
    where = f"{fallback.transport}|{fallback.host}|{fallback.port}" if fallback is not None else "-"
    mac = hmac.new(key, f"{branch}|{conn_id}|{where}".encode(), hashlib.sha256).digest()[:FLOW_MAC_BYTES]
    return f"{conn_id}.{mac.hex()}"


def _verified_flow(key: bytes, vias: list[str]) -> tuple[int, Destination | None] | None:
    """The connection id and fallback of a response whose top Via is ours, else None."""
    token = header_param(vias[0], FLOW_PARAM)
    branch = header_param(vias[0], "branch")
    if not token or not branch:
        return None
    conn_id = sipsyntax.number(token.partition(".")[0], MAX_CONN_ID)
    if not conn_id:
        return None
    fallback = _fallback_of(vias[1])
    if not hmac.compare_digest(token, _flow_token(key, branch, conn_id, fallback)):
        return None
    return conn_id, fallback


def _without_top_via(message: SipMessage) -> bytes:
    lines = [message.start_line]
    first_via = True
    for name, value in message.headers:
        if name == "via" and first_via:
            first_via = False
            rest = split_list_value(value)[1:]
            if rest:
                lines.append(f"Via: {', '.join(rest)}")
            continue
        lines.append(f"{_title(name)}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + message.body


def _fallback_of(via: str) -> Destination | None:
    """Where a response goes when its connection is gone (RFC 3261 18.2.2): ``received``, sent-by port."""
    protocol, _, rest = via.partition(" ")
    sent_by = rest.split(";", 1)[0].strip()
    transport = protocol.rsplit("/", 1)[-1].lower()
    try:
        uri = parse_uri(f"sip:{sent_by}")
    except SipUriError:
        return None
    host = header_param(via, "received") or uri.host
    return Destination(transport if transport in ("tcp", "tls") else "tcp", host, uri.default_port())
