"""REGISTER (RFC 3261 section 10.3, RFC 5626 section 6): authenticate, bound, store, answer.

Steps, in RFC order: the To URI names the address-of-record (``user@domain``);
with users configured the domain must be one of theirs and the request must
carry the user's own digest credentials (401 with a challenge otherwise, 403
for wrong ones); ``Contact: *`` needs ``Expires: 0`` and no other contact;
each contact's expiry is its ``expires`` parameter, else the Expires header,
else ``registrar_default_expires``, cut to ``registrar_max_expires``; a
non-zero one below ``registrar_min_expires`` is answered 423 with
Min-Expires; ``q`` must be a valid qvalue. The store then applies the
request atomically (Call-ID/CSeq ordering, ``registrar_max_contacts``), and
the 200 lists every current contact with its remaining time.

Every binding remembers the connection it came on: the proxy reaches the
contact over that connection (the only way through a NAT, and the only
address a TCP phone listens on). A contact with ``+sip.instance`` and
``reg-id`` is an RFC 5626 flow: its key is the instance and reg-id, the 200
carries ``Require: outbound``, and the binding goes the moment its
connection closes (the phone registers a new flow when it reconnects), as does
a binding made over a WebSocket (only its connection reaches a browser). Other
bindings outlive their connection: requests then go to the Contact's
address, as RFC 3261 has it.
"""

from __future__ import annotations

import re
import time
from typing import Final

from sipwire.errors import SipwireError
from sipwire.transport import sipsyntax
from sipwire.transport.routers.proxystate import (
    COUNT_AUTH_OK,
    COUNT_REGISTER_REFUSED,
    COUNT_REGISTERED,
    COUNT_UNREGISTERED,
    ProxyState,
    hostport,
)
from sipwire.transport.routers.sqlitestore import StoreBusyError
from sipwire.transport.routers.store import Binding, RegisterRequest
from sipwire.transport.routing import RouteContext
from sipwire.transport.sip import SipMessage, header_params
from sipwire.transport.sipuri import SipUriError, parse_uri, uri_of

#: A qvalue (RFC 3261 section 25.1): 0 to 1 with at most three decimals.
_QVALUE: Final = re.compile(r"(0(\.[0-9]{0,3})?|1(\.0{0,3})?)")
#: Longest User-Agent kept with a binding (shown by the console).
MAX_USER_AGENT_CHARS: Final = 200


class _Refusal(SipwireError):  # noqa: N818 - control flow inside this module, never raised out of it
    """A REGISTER to answer with an error status, and headers."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or []


def register(state: ProxyState, message: SipMessage, ctx: RouteContext) -> None:
    """Handle one REGISTER; see the module docstring."""
    now = time.time()
    try:
        to_uri = parse_uri(uri_of(message.header("to") or ""))
    except SipUriError as error:
        state.answer(message, ctx, 400, f"Bad Request ({error})")
        return
    if not to_uri.user:
        state.answer(message, ctx, 400, "Bad Request (the To URI names no user)")
        return
    domain = to_uri.host.lower()
    aor = f"{to_uri.user}@{domain}"
    try:
        if state.auth is not None:
            if domain not in state.store.served_domains():
                ctx.count(COUNT_REGISTER_REFUSED)
                state.answer(message, ctx, 403, "Forbidden (domain not served here)")
                return
            verdict = state.auth.verify(message, "authorization", domain, aor, now)
            if verdict.action != "ok":
                state.unverified(message, ctx, verdict, domain, proxy=False)
                return
            ctx.count(COUNT_AUTH_OK)
        request = _request(state, message, ctx, aor, now)
        _apply(state, message, ctx, request, now)
    except _Refusal as refusal:
        ctx.count(COUNT_REGISTER_REFUSED)
        state.answer(message, ctx, refusal.status, refusal.reason, refusal.headers)
    except StoreBusyError as error:
        state.busy(message, ctx, error)


def _apply(state: ProxyState, message: SipMessage, ctx: RouteContext, request: RegisterRequest, now: float) -> None:
    settings = state.settings
    if request.wildcard or request.bindings:
        status = state.store.register(request, settings.registrar_max_contacts, now)
        if not status.ok and status.reason == "out_of_order":
            raise _Refusal(500, "Server Internal Error (REGISTER out of order: CSeq not above the last one)")
        if not status.ok:
            raise _Refusal(403, f"Forbidden (more than {settings.registrar_max_contacts} contacts)")
        ctx.count(COUNT_REGISTERED if status.added or not status.removed else COUNT_UNREGISTERED)
    current = state.store.bindings(request.aor, now)
    headers = [("Contact", _contact_value(binding, now)) for binding in current]
    outbound = any(binding.reg_id for binding in request.bindings if binding.expires > now)
    if outbound and "outbound" in _option_tags(message, "supported"):
        headers.append(("Require", "outbound"))
    state.answer(message, ctx, 200, "OK", headers)


def _request(state: ProxyState, message: SipMessage, ctx: RouteContext, aor: str, now: float) -> RegisterRequest:
    """What the REGISTER asks, bounded (RFC 3261 section 10.3 steps 6-7)."""
    settings = state.settings
    cseq = sipsyntax.number((message.header("cseq") or "").partition(" ")[0], sipsyntax.MAX_CSEQ) or 0
    header_expires = message.header("expires")
    default = settings.registrar_default_expires
    if header_expires is not None:
        parsed = sipsyntax.number(header_expires, sipsyntax.MAX_CSEQ)
        default = default if parsed is None else parsed
    contacts = message.values("contact")
    for name, value in (("Call-ID", message.call_id), *(("Contact", contact) for contact in contacts)):
        if not sipsyntax.is_utf8(value):  # the store keeps UTF-8 text only
            raise _Refusal(400, f"Bad Request ({name} is not UTF-8)")
    if "*" in contacts:
        if len(contacts) != 1 or header_expires is None or default != 0:
            raise _Refusal(400, "Bad Request (Contact: * needs Expires: 0 and no other contact)")
        return RegisterRequest(aor, message.call_id, cseq, wildcard=True)
    envelope = ctx.envelope
    user_agent = _displayable((message.header("user-agent") or "")[:MAX_USER_AGENT_CHARS])
    bindings = []
    for contact in contacts:
        try:
            uri = uri_of(contact)
            parse_uri(uri)
        except SipUriError as error:
            raise _Refusal(400, f"Bad Request (Contact: {error})") from None
        params = dict(header_params(contact))
        expires = _expires(state, params.get("expires"), default)
        q = params.get("q", "")
        if q and not _QVALUE.fullmatch(q):
            raise _Refusal(400, f"Bad Request (q={q[:20]!r} is not a qvalue)")
        instance = params.get("+sip.instance", "")
        reg_id = sipsyntax.number(params.get("reg-id", ""), sipsyntax.MAX_CSEQ) or 0
        if instance and reg_id:
            key = f"flow {instance} {reg_id}"
        elif instance:
            key = f"instance {instance}"
        else:
            key = f"uri {uri}"
        bindings.append(
            Binding(
                aor, key, uri, instance, reg_id, q, envelope.conn_id, envelope.transport,
                hostport(envelope.local), hostport(envelope.remote),
                now + expires if expires else now, message.call_id, cseq, user_agent, now,
            )
        )  # fmt: skip
    return RegisterRequest(aor, message.call_id, cseq, wildcard=False, bindings=bindings)


def _expires(state: ProxyState, param: str | None, default: int) -> int:
    """A contact's granted seconds: 0 removes it; too short is refused with 423, too long is cut."""
    settings = state.settings
    seconds = default
    if param is not None:
        parsed = sipsyntax.number(param, sipsyntax.MAX_CSEQ)
        seconds = default if parsed is None else parsed  # RFC 4475 section 3.1.2.4: ignore a bad value
    if 0 < seconds < settings.registrar_min_expires:
        raise _Refusal(423, "Interval Too Brief", [("Min-Expires", str(settings.registrar_min_expires))])
    return min(seconds, settings.registrar_max_expires)


def _displayable(text: str) -> str:
    """Text kept for display only (User-Agent), its bytes that were not UTF-8 replaced: some phones send Latin-1."""
    return text if sipsyntax.is_utf8(text) else text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _contact_value(binding: Binding, now: float) -> str:
    params = f";expires={max(0, int(binding.expires - now))}"
    if binding.q:
        params += f";q={binding.q}"
    if binding.instance:
        params += f";+sip.instance={binding.instance}"
    if binding.reg_id:
        params += f";reg-id={binding.reg_id}"
    return f"<{binding.contact}>{params}"


def _option_tags(message: SipMessage, header: str) -> set[str]:
    return {tag.strip().lower() for line in message.header_lines(header) for tag in line.split(",")}
