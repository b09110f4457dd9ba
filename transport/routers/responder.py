"""The ``responder`` router: answers requests locally, for health checks and benchmarks.

It behaves as a stateless user agent server (RFC 3261 section 8.2):
OPTIONS, REGISTER, BYE, CANCEL and INFO/UPDATE/MESSAGE/NOTIFY get 200;
INVITE gets 200 with an SDP answer and a Contact, so sipp's built-in
``uac`` scenario completes; ACK is absorbed (no response is ever sent to
an ACK); responses are dropped; any other method gets 405 with Allow.
"""

from __future__ import annotations

from typing import Final

from sipwire.transport.routing import RouteContext
from sipwire.transport.sip import SipMessage, build_response

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
DEFAULT_REGISTER_EXPIRES: Final = 3600


def route(message: SipMessage, ctx: RouteContext) -> None:
    if not message.is_request:
        return
    method = message.method
    envelope = ctx.envelope
    source = envelope.remote
    if method in _PLAIN_OK:
        extra = [("Allow", _ALLOW), ("Accept", "application/sdp")] if method == "OPTIONS" else []
        ctx.reply(build_response(message, 200, "OK", extra_headers=extra, via_source=source))
    elif method == "INVITE":
        local_host, local_port = envelope.local
        contact = f"<sip:sipwire@{_uri_host(local_host)}:{local_port};transport={envelope.transport}>"
        ctx.reply(
            build_response(
                message,
                200,
                "OK",
                extra_headers=[("Contact", contact), ("Content-Type", "application/sdp"), ("Allow", _ALLOW)],
                body=_sdp_answer(local_host),
                via_source=source,
            )
        )
    elif method == "REGISTER":
        contacts = message.values("contact")
        expires = message.header("expires") or str(DEFAULT_REGISTER_EXPIRES)
        extra = [
            ("Contact", f"{contact};expires={expires}" if "expires=" not in contact else contact)
            for contact in contacts
            if contact != "*"
        ]
        ctx.reply(build_response(message, 200, "OK", extra_headers=extra, via_source=source))
    elif method != "ACK":
        ctx.reply(
            build_response(message, 405, "Method Not Allowed", extra_headers=[("Allow", _ALLOW)], via_source=source)
        )


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
