"""The ``responder`` router: answers requests locally, for health checks and benchmarks.

It behaves as a stateless user agent server (RFC 3261 section 8.2):
OPTIONS, REGISTER, BYE, CANCEL and INFO/UPDATE/MESSAGE/NOTIFY get 200;
INVITE gets 200 with an SDP answer and a Contact, so sipp's built-in
``uac`` scenario completes; ACK is absorbed (no response is ever sent to
an ACK); responses are dropped. Before that, the checks of section 8.2
run in its order: a method it knows but does not serve gets 405 and one
it does not know 501 (both with Allow); a Request-URI scheme other than
sip/sips/tel gets 416; a Require naming any option tag gets 420 with
Unsupported; an INVITE whose body is not SDP gets 415, and one whose
Accept excludes SDP gets 406.
"""

from __future__ import annotations

from typing import Final

from sipwire.transport.routing import RouteContext
from sipwire.transport.sip import SipMessage
from sipwire.transport.sipresponse import build_response
from sipwire.transport.sipuri import uri_of

ALLOWED_METHODS: Final = (
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "OPTIONS",
    "REGISTER",
    "INFO",
    "UPDATE",
    "MESSAGE",
    "NOTIFY",
)
_ALLOW: Final = ", ".join(ALLOWED_METHODS)
_PLAIN_OK: Final = frozenset({"OPTIONS", "BYE", "CANCEL", "INFO", "UPDATE", "MESSAGE", "NOTIFY"})
#: Registered methods this UAS recognises but does not serve: 405, not 501 (RFC 3261 section 8.2.1).
KNOWN_UNSERVED_METHODS: Final = frozenset({"PRACK", "SUBSCRIBE", "REFER", "PUBLISH"})
#: Request-URI schemes a SIP UAS serves (RFC 3261 section 8.2.2.1; tel: per RFC 3966).
SUPPORTED_SCHEMES: Final = frozenset({"sip", "sips", "tel"})
#: The only body an INVITE is answered for, and the Accept values that admit it.
SDP: Final = "application/sdp"
_SDP_ACCEPTED: Final = frozenset({SDP, "application/*", "*/*"})
DEFAULT_REGISTER_EXPIRES: Final = 3600

Refusal = tuple[int, str, list[tuple[str, str]]]


def route(message: SipMessage, ctx: RouteContext) -> None:
    if not message.is_request or message.method == "ACK":
        return
    envelope = ctx.envelope
    source = envelope.remote
    refusal = _refusal(message)
    if refusal is not None:
        status, reason, extra = refusal
        ctx.reply(build_response(message, status, reason, extra_headers=extra, via_source=source))
        return
    method = message.method
    if method in _PLAIN_OK:
        extra = [("Allow", _ALLOW), ("Accept", SDP)] if method == "OPTIONS" else []
        ctx.reply(build_response(message, 200, "OK", extra_headers=extra, via_source=source))
    elif method == "INVITE":
        local_host, local_port = envelope.local
        contact = f"<sip:sipwire@{_uri_host(local_host)}:{local_port};transport={envelope.transport}>"
        ctx.reply(
            build_response(
                message,
                200,
                "OK",
                extra_headers=[("Contact", contact), ("Content-Type", SDP), ("Allow", _ALLOW)],
                body=_sdp_answer(local_host),
                via_source=source,
            )
        )
    else:  # REGISTER: every other method was refused above
        contacts = message.values("contact")
        expires = message.header("expires") or str(DEFAULT_REGISTER_EXPIRES)
        extra = [
            ("Contact", f"{contact};expires={expires}" if "expires=" not in contact else contact)
            for contact in contacts
            if contact != "*"
        ]
        ctx.reply(build_response(message, 200, "OK", extra_headers=extra, via_source=source))


def _refusal(message: SipMessage) -> Refusal | None:
    """The final non-2xx answer the checks of RFC 3261 section 8.2 give this request, or None to serve it."""
    method = message.method
    if method not in ALLOWED_METHODS:
        if method in KNOWN_UNSERVED_METHODS:
            return 405, "Method Not Allowed", [("Allow", _ALLOW)]
        return 501, "Not Implemented", [("Allow", _ALLOW)]
    if _scheme(message.uri) not in SUPPORTED_SCHEMES:
        return 416, "Unsupported URI Scheme", []
    if method == "REGISTER" and _scheme(uri_of(message.header("to") or "")) not in ("sip", "sips"):
        return 416, "Unsupported URI Scheme (To)", []  # an address-of-record is a SIP URI (section 10.3)
    if method != "CANCEL" and "require" in message.index:
        required = message.values("require")
        if required:  # this UAS supports no extension (section 8.2.2.3)
            return 420, "Bad Extension", [("Unsupported", ", ".join(required))]
    if method == "INVITE":
        content_type = (message.header("content-type") or "").partition(";")[0].strip().lower()
        if message.body and content_type != SDP:
            return 415, "Unsupported Media Type", [("Accept", SDP)]
        accepted = {value.partition(";")[0].strip().lower() for value in message.values("accept")}
        if accepted and not accepted & _SDP_ACCEPTED:
            return 406, "Not Acceptable", []
    return None


def _scheme(uri: str) -> str:
    return uri.partition(":")[0].lower()


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _sdp_answer(host: str) -> bytes:
    """A minimal SDP answer (RFC 4566) offering PCMU on a placeholder port."""
    family = "IP6" if ":" in host else "IP4"
    return (
        "v=0\r\n"
        f"o=sipwire 1 1 IN {family} {host}\r\n"
        "s=sipwire\r\n"
        f"c=IN {family} {host}\r\n"
        "t=0 0\r\n"
        "m=audio 6000 RTP/AVP 0\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
    ).encode("ascii")
