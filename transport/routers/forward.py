"""Forwarding requests, statelessly (RFC 3261 section 16.11) through RFC 5626 flows.

For each request, in RFC 3261 section 16.3-16.6 order:

1. An ACK for one of this proxy's own non-2xx answers ends here (its To tag
   says so, see :mod:`transport.routers.proxystate`).
2. Max-Forwards 0 is answered 483.
3. Route values that name this proxy are consumed (loose routing, RFC 3261
   section 16.4): a Record-Route it wrote (its ``swr`` token must be valid for
   this Call-ID, else 403), or a pre-loaded route to its own address or
   domain. The last token consumed names the connection of the leg the
   request goes to.
4. Loop detection (482): a Via of this proxy whose branch carries the same
   hash of Request-URI, From tag, Call-ID, CSeq number and Route.
5. With users configured, an out-of-dialog request (no To tag) from a served
   domain must carry that user's Proxy-Authorization (407 challenge); ACK and
   CANCEL are never challenged (RFC 3261 section 22.1).
6. The target: the connection a token named (Routes beyond it are the
   next hop's to follow); else the next Route beyond this proxy; else the
   leg a token named by address (the Request-URI); else a registered contact of the Request-URI's AOR (the URI is
   rewritten to that contact and the request leaves on the connection it
   registered over, or, once that closed, goes to the Contact's address);
   else 404/480 for a served domain; else ``--upstream``. A request from
   outside the served domains to outside them is refused (403, not an open relay).
7. Dialog-creating requests (INVITE, SUBSCRIBE, REFER) are record-routed
   twice, one ``lr`` URI per leg with the token of that leg's connection,
   so in-dialog requests in either direction come back here and leave on
   the right connection whatever the Contact says. A WebSocket leg's URI
   says ``transport=ws`` (RFC 7118 section 5.2 defines no other URI value),
   a sips: URI for WSS; an in-dialog request's Via names the transport and
   address of the leg it leaves on, read back from that URI (``WS``/``WSS``
   over WebSockets).

The proxy's branch is ``z9hG4bKsw`` + the loop hash + a hash of the
client's branch, sent-by and connection: a retransmission, the CANCEL and
the ACK of a non-2xx answer get the INVITE's branch, as a stateless proxy
must (RFC 3261 section 16.11), so the next hop matches them to it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Final, NamedTuple

from sipwire.errors import SipwireError
from sipwire.transport import sipsyntax
from sipwire.transport.outcome import WriteResult
from sipwire.transport.routers.flowtoken import ROUTE_PARAM, fallback_of
from sipwire.transport.routers.proxystate import (
    COUNT_ACK_ABSORBED,
    COUNT_AUTH_OK,
    COUNT_FLOWS_CLOSED,
    COUNT_FORWARDED,
    COUNT_IN_DIALOG,
    COUNT_LOOP,
    COUNT_NOT_FOUND,
    COUNT_RECORD_ROUTED,
    COUNT_RELAY_DENIED,
    COUNT_TOO_MANY_HOPS,
    ProxyState,
    hostport,
)
from sipwire.transport.routers.rewrite import forwarded_request, with_received
from sipwire.transport.routers.sqlitestore import StoreBusyError
from sipwire.transport.routing import Destination, Outcome, RouteContext
from sipwire.transport.sip import SipMessage, header_param
from sipwire.transport.sipuri import SipUri, SipUriError, parse_uri, uri_of

#: What a forwarded request without Max-Forwards starts from (RFC 3261 section 8.1.1.6).
DEFAULT_MAX_FORWARDS: Final = 70
#: Requests that create a dialog: record-routed, so the dialog's requests come back through the proxy.
DIALOG_METHODS: Final = frozenset({"INVITE", "SUBSCRIBE", "REFER"})
#: Requests never challenged and always relayed: they cannot carry new credentials (RFC 3261 section 22.1).
UNCHALLENGED_METHODS: Final = frozenset({"ACK", "CANCEL"})
#: Transports whose peers are reached only over their own connection (no outbound WebSocket, RFC 7118).
WEBSOCKET_TRANSPORTS: Final = frozenset({"ws", "wss"})
#: The start of this proxy's branches (the RFC 3261 magic cookie, then ours).
BRANCH_PREFIX: Final = "z9hG4bKsw"
#: Hex digits of the loop hash and of the transaction hash in a branch.
LOOP_DIGITS: Final = 10
TRANSACTION_DIGITS: Final = 14


class Target(NamedTuple):
    """Where a request goes: a connection (``conn_id``) or a destination, and the URI it carries."""

    request_uri: str
    conn_id: int  # 0: by destination
    destination: Destination | None
    local: str  # our HOST:PORT facing that leg ("" when unknown: the caller's side is used)
    transport: str
    registered: bool  # a registered flow: its binding goes when the connection is found gone


class _Answered(SipwireError):  # noqa: N818 - control flow inside this module, never raised out of it
    """The request was answered locally (or dropped); nothing to forward."""


def forward(state: ProxyState, message: SipMessage, ctx: RouteContext) -> None:
    """Forward one request that is not a REGISTER; see the module docstring."""
    if message.method == "ACK" and state.is_own_ack(message):
        ctx.count(COUNT_ACK_ABSORBED)
        return
    max_forwards = sipsyntax.number(message.header("max-forwards") or "", sipsyntax.MAX_FORWARDS_LIMIT)
    hops = DEFAULT_MAX_FORWARDS if max_forwards is None else max_forwards
    if hops <= 0:
        ctx.count(COUNT_TOO_MANY_HOPS)
        state.answer(message, ctx, 483, "Too Many Hops")
        return
    try:
        _forward(state, message, ctx, hops - 1)
    except _Answered:
        return
    except StoreBusyError as error:
        state.busy(message, ctx, error)


def _forward(state: ProxyState, message: SipMessage, ctx: RouteContext, max_forwards: int) -> None:
    envelope = ctx.envelope
    in_dialog = bool(header_param(message.header("to") or "", "tag"))
    routes = message.values("route")
    consumed, flow, leg = _own_routes(state, message, ctx, routes)
    remaining = routes[consumed:]
    loop = _loop_hash(message, routes)
    if _looped(state, message, loop):
        ctx.count(COUNT_LOOP)
        state.answer(message, ctx, 482, "Loop Detected")
        return
    realm = ""
    if state.auth is not None and not in_dialog and message.method not in UNCHALLENGED_METHODS:
        realm = _authenticate(state, message, ctx)
    target = _target(state, message, ctx, (flow, leg), remaining, trusted=bool(realm) or flow is not None)
    record_routes = _record_routes(state, message, ctx, target) if not in_dialog else []
    if not in_dialog and message.method in DIALOG_METHODS:
        ctx.count(COUNT_RECORD_ROUTED)
    top_via_line = message.header_lines("via")[0]
    client_via = with_received(top_via_line, envelope.remote)
    branch = f"{BRANCH_PREFIX}{loop}{_transaction_hash(top_via_line, envelope.conn_id)}"
    token = state.tokens.via_token(branch, envelope.conn_id, fallback_of(client_via))
    sent_by = target.local or hostport(envelope.local)
    own_via = f"SIP/2.0/{target.transport.upper()} {sent_by};branch={branch};swf={token}"
    data = forwarded_request(
        message, request_uri=target.request_uri, own_via=own_via, client_via=client_via, routes=remaining,
        record_routes=record_routes, max_forwards=max_forwards, realm=realm,
    )  # fmt: skip
    ctx.count(COUNT_IN_DIALOG if in_dialog else COUNT_FORWARDED)

    def on_outcome(outcome: Outcome) -> None:
        if outcome.ok:
            return
        if target.registered and outcome.result is WriteResult.CONNECTION_GONE:
            _flow_gone(state, ctx, target.conn_id)
        status, reason = (480, "Temporarily Unavailable") if target.conn_id else (503, "Service Unavailable")
        state.answer(message, ctx, status, f"{reason} ({outcome.result.label})")

    if target.conn_id:
        ctx.send_on(target.conn_id, data, on_outcome, failures_only=True)
    elif target.destination is not None:
        ctx.send(target.destination, data, on_outcome, failures_only=True)


def _own_routes(
    state: ProxyState, message: SipMessage, ctx: RouteContext, routes: list[str]
) -> tuple[int, int | None, SipUri | None]:
    """How many leading Route values name this proxy, and the connection the last token of ours names, with its URI.

    That URI is the Record-Route this proxy wrote for the leg: its address and transport are the proxy's on that leg.
    """
    flow: int | None = None
    leg: SipUri | None = None
    consumed = 0
    for route in routes:
        try:
            uri = parse_uri(uri_of(route))
        except SipUriError:
            break
        token = uri.params.get(ROUTE_PARAM)
        verified = None if token is None else state.tokens.verified_route(token, message.call_id)
        if verified is not None:
            flow, leg = verified, uri
        elif not _is_local(state, uri, ctx):
            break  # another proxy's route (its token, if any, is its own business)
        elif token is not None:
            state.answer(message, ctx, 403, "Forbidden (Route token not valid for this dialog)")
            raise _Answered
        consumed += 1
    return consumed, flow, leg


def _is_local(state: ProxyState, uri: SipUri, ctx: RouteContext) -> bool:
    """A URI naming this proxy: the address the request arrived on, or a served domain on this port."""
    host, port = ctx.envelope.local
    if uri.host.strip("[]") == host:
        return uri.default_port() == port
    return uri.host.lower() in state.store.served_domains() and uri.port in (None, port)


def _authenticate(state: ProxyState, message: SipMessage, ctx: RouteContext) -> str:
    """The realm a request from a served domain authenticated in ("" when From is not in one)."""
    assert state.auth is not None
    try:
        from_uri = parse_uri(uri_of(message.header("from") or ""))
    except SipUriError:
        return ""
    domain = from_uri.host.lower()
    if domain not in state.store.served_domains():
        return ""
    verdict = state.auth.verify(message, "proxy-authorization", domain, f"{from_uri.user}@{domain}", time.time())
    if verdict.action != "ok":
        state.unverified(message, ctx, verdict, domain, proxy=True)
        raise _Answered
    ctx.count(COUNT_AUTH_OK)
    return domain


def _target(
    state: ProxyState,
    message: SipMessage,
    ctx: RouteContext,
    token: tuple[int | None, SipUri | None],
    remaining: list[str],
    *,
    trusted: bool,
) -> Target:
    """Where the request goes (step 6 of the module docstring); answers and raises _Answered when nowhere.

    ``token``: the connection the last Record-Route token of ours named, and that Record-Route's URI.
    """
    flow, leg = token
    if flow and leg is not None:
        # The leg's own connection, whatever Routes follow ours (that peer's to follow): the token names where the
        # dialog goes, and a Route after it is no licence to relay a dialog's requests to an address of one's choice.
        _uri_or_answer(state, message, ctx, message.uri)
        local = hostport((leg.host, leg.port)) if leg.port else ""
        return Target(message.uri, flow, None, local, _leg_transport(leg), registered=False)
    if remaining:
        if not trusted:
            _deny_relay(state, message, ctx)
        try:
            hop_uri = uri_of(remaining[0])
        except SipUriError as error:
            state.answer(message, ctx, 400, f"Bad Request (Route: {error})")
            raise _Answered from None
        hop = _uri_or_answer(state, message, ctx, hop_uri)
        destination = Destination(hop.transport, hop.host, hop.default_port())
        return Target(message.uri, 0, destination, "", hop.transport, registered=False)
    uri = _uri_or_answer(state, message, ctx, message.uri)
    if flow is not None:  # our Record-Route of a leg reached by address: the Request-URI is the next hop
        destination = Destination(uri.transport, uri.host, uri.default_port())
        return Target(message.uri, 0, destination, "", uri.transport, registered=False)
    aor = f"{uri.user}@{uri.host.lower()}" if uri.user else ""
    bindings = state.store.bindings(aor, time.time()) if aor else []
    if bindings:
        best = bindings[0]
        if best.conn_id:
            return Target(best.contact, best.conn_id, None, best.local, best.transport, registered=True)
        contact = _uri_or_answer(state, message, ctx, best.contact)  # its connection closed: RFC 3261 routing
        if contact.transport == "ws":
            ctx.count(COUNT_NOT_FOUND)
            state.answer(message, ctx, 480, "Temporarily Unavailable (its WebSocket is closed)")
            raise _Answered
        destination = Destination(contact.transport, contact.host, contact.default_port())
        return Target(best.contact, 0, destination, "", contact.transport, registered=False)
    if uri.host.lower() in state.store.served_domains():
        ctx.count(COUNT_NOT_FOUND)
        if state.store.user(aor) is None:
            state.answer(message, ctx, 404, "Not Found")
        else:
            state.answer(message, ctx, 480, "Temporarily Unavailable (not registered)")
        raise _Answered
    if not trusted:
        _deny_relay(state, message, ctx)
    if state.upstream is None:
        ctx.count(COUNT_NOT_FOUND)
        state.answer(message, ctx, 404, "Not Found (no binding and no upstream)")
        raise _Answered
    return Target(message.uri, 0, state.upstream, "", state.upstream.transport, registered=False)


def _deny_relay(state: ProxyState, message: SipMessage, ctx: RouteContext) -> None:
    """With users configured, a stranger's request to outside the served domains is refused (not an open relay).

    ACK and CANCEL pass: they cannot start anything, and they follow requests that were admitted.
    """
    if state.auth is not None and message.method not in UNCHALLENGED_METHODS:
        ctx.count(COUNT_RELAY_DENIED)
        state.answer(message, ctx, 403, "Forbidden (relaying denied)")
        raise _Answered


def _uri_or_answer(state: ProxyState, message: SipMessage, ctx: RouteContext, text: str) -> SipUri:
    try:
        return parse_uri(text)
    except SipUriError as error:
        state.answer(message, ctx, 416, f"Unsupported URI Scheme ({error})")
        raise _Answered from None


def _record_routes(state: ProxyState, message: SipMessage, ctx: RouteContext, target: Target) -> list[str]:
    """Two ``lr`` Record-Route URIs, the callee's leg first, each with the token of its leg's connection."""
    if message.method not in DIALOG_METHODS:
        return []
    envelope = ctx.envelope
    tokens, call_id = state.tokens, message.call_id
    caller = _route_uri(hostport(envelope.local), envelope.transport, tokens.route_token(envelope.conn_id, call_id))
    callee_local = target.local or hostport(envelope.local)
    callee = _route_uri(callee_local, target.transport, tokens.route_token(target.conn_id, call_id))
    return [callee, caller]


def _route_uri(local: str, transport: str, token: str) -> str:
    """This proxy's Record-Route for one leg; a WebSocket leg is ``transport=ws``, WSS as a sips: URI (RFC 7118 5.2)."""
    if transport in WEBSOCKET_TRANSPORTS:
        scheme = "sips" if transport == "wss" else "sip"
        return f"<{scheme}:{local};transport=ws;lr;{ROUTE_PARAM}={token}>"
    return f"<sip:{local};transport={transport};lr;{ROUTE_PARAM}={token}>"


def _leg_transport(uri: SipUri) -> str:
    """The transport of a leg this proxy record-routed, read back from its URI (see :func:`_route_uri`)."""
    if uri.transport == "ws":
        return "wss" if uri.scheme == "sips" else "ws"
    return uri.transport


def _loop_hash(message: SipMessage, routes: list[str]) -> str:
    """The fields a loop leaves unchanged (RFC 3261 section 16.6 step 8), without the To tag (section 16.11)."""
    from_tag = header_param(message.header("from") or "", "tag") or ""
    cseq_number = (message.header("cseq") or "").partition(" ")[0]
    text = f"{message.uri}|{from_tag}|{message.call_id}|{cseq_number}|{','.join(routes)}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:LOOP_DIGITS]


def _transaction_hash(top_via: str, conn_id: int) -> str:
    """The client's transaction (branch and sent-by) on its connection: the same for its CANCEL and ACK."""
    first = top_via.split(",", 1)[0]
    branch = header_param(first, "branch") or first
    sent_by = first.split(";", 1)[0].strip()
    text = f"{branch}|{sent_by}|{conn_id}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:TRANSACTION_DIGITS]


def _looped(state: ProxyState, message: SipMessage, loop: str) -> bool:
    """A Via of this proxy (valid token) with the same loop hash: the request came back unchanged."""
    vias = message.values("via")
    start = len(BRANCH_PREFIX)
    for index, via in enumerate(vias):
        branch = header_param(via, "branch") or ""
        same_hash = branch.startswith(BRANCH_PREFIX) and branch[start : start + LOOP_DIGITS] == loop
        if same_hash and state.tokens.verified_via(vias, index) is not None:
            return True
    return False


def _flow_gone(state: ProxyState, ctx: RouteContext, conn_id: int) -> None:
    """A registered flow's connection is gone (its close announcement may still be on its way): drop its bindings."""
    try:
        removed = state.store.connections_closed([conn_id])
    except StoreBusyError:
        return  # the announcement or the expiry removes them
    for _ in range(removed):
        ctx.count(COUNT_FLOWS_CLOSED)
