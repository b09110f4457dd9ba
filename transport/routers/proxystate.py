"""What the proxy router's parts share in one worker: settings, store, digest, tokens; local answers.

Local answers (a challenge, 403, 404, 480, 482, 483, 503...) to an INVITE
get a To tag derived from the request under the instance key
(:meth:`ProxyState.local_tag`), so the ACK the caller sends for such a
non-2xx answer is recognised and absorbed by whichever worker receives it,
with no transaction state (RFC 3261 section 16.11 leaves a stateless proxy
no other way).

Counters (``ctx.count``) come from fixed names only: the ``COUNT_*``
constants, and ``auth_failed.<reason>`` with a reason from
:mod:`transport.routers.digest`'s fixed set. Each failure but a stale nonce is
also reported to the transport (``ctx.auth_failed()``), which charges the
peer's address against ``auth_failures_per_ip``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from sipwire.config import Settings
from sipwire.transport.ratelog import RateLimitedLog
from sipwire.transport.routers.digest import DigestAuth, Verdict
from sipwire.transport.routers.flowtoken import FlowTokens
from sipwire.transport.routers.store import RegistrarStore
from sipwire.transport.routing import Destination, RouteContext
from sipwire.transport.sip import SipMessage, header_param
from sipwire.transport.sipresponse import build_response

log = logging.getLogger("sipwire.proxy")

COUNT_AUTH_OK: Final = "auth.ok"
COUNT_AUTH_CHALLENGED: Final = "auth.challenged"
COUNT_AUTH_FAILED_PREFIX: Final = "auth_failed."
COUNT_REGISTERED: Final = "registrar.registered"
COUNT_UNREGISTERED: Final = "registrar.unregistered"
COUNT_REGISTER_REFUSED: Final = "registrar.refused"
COUNT_FLOWS_CLOSED: Final = "registrar.flows_closed"
COUNT_STORE_BUSY: Final = "registrar.busy"
COUNT_FORWARDED: Final = "proxy.forwarded"
COUNT_IN_DIALOG: Final = "proxy.in_dialog"
COUNT_RECORD_ROUTED: Final = "proxy.record_routed"
COUNT_LOOP: Final = "proxy.loop_detected"
COUNT_TOO_MANY_HOPS: Final = "proxy.too_many_hops"
COUNT_NOT_FOUND: Final = "proxy.not_found"
COUNT_ACK_ABSORBED: Final = "proxy.ack_absorbed"
COUNT_RELAYED: Final = "proxy.responses_relayed"
COUNT_UNVERIFIED: Final = "proxy.responses_dropped"
COUNT_RELAY_DENIED: Final = "proxy.relay_denied"

#: Failures the peer's address is not charged for (``auth_failures_per_ip``): a phone that kept a nonce past
#: ``digest_nonce_seconds`` is answered ``stale=true`` and retries without its user, as RFC 3261 intends.
UNCHARGED_FAILURES: Final = frozenset({"stale_nonce"})

#: Seconds a 500 for a busy registrar tells the phone to wait (Retry-After).
BUSY_RETRY_AFTER_SECONDS: Final = 5


@dataclass(slots=True)
class ProxyState:
    """Per-worker proxy state, built once by the router's ``setup``."""

    settings: Settings
    store: RegistrarStore
    tokens: FlowTokens
    auth: DigestAuth | None  # None: open_registrar (labs), nobody is authenticated
    upstream: Destination | None
    ratelog: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log))
    next_purge: float = 0.0

    def local_tag(self, message: SipMessage) -> str:
        """The To tag of this proxy's own answers to ``message``: the same for the INVITE and its ACK."""
        from_tag = header_param(message.header("from") or "", "tag") or ""
        cseq_number = (message.header("cseq") or "").partition(" ")[0]
        return "sw" + self.tokens.mac(f"tag|{message.call_id}|{from_tag}|{cseq_number}")[:16]

    def is_own_ack(self, message: SipMessage) -> bool:
        """An ACK for a non-2xx answer this proxy made itself: hop-by-hop, it ends here."""
        return header_param(message.header("to") or "", "tag") == self.local_tag(message)

    def answer(
        self, message: SipMessage, ctx: RouteContext, status: int, reason: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Answer a request locally (never an ACK), with the request-derived To tag."""
        if message.method == "ACK":
            return
        ctx.reply(
            build_response(
                message, status, reason, to_tag=self.local_tag(message), extra_headers=headers,
                via_source=ctx.envelope.remote,
            )
        )  # fmt: skip

    def unverified(self, message: SipMessage, ctx: RouteContext, verdict: Verdict, realm: str, *, proxy: bool) -> None:
        """Answer a request whose credentials did not pass: a challenge (401/407) or 403; count why."""
        if self.auth is None:
            return
        if verdict.reason:
            ctx.count(COUNT_AUTH_FAILED_PREFIX + verdict.reason)
            if verdict.reason not in UNCHARGED_FAILURES:
                ctx.auth_failed()
            self.ratelog.log(
                logging.INFO, f"auth_failed.{verdict.reason}", "authentication failed (%s) for %s from %s:%d",
                verdict.reason, ascii(realm)[:80], *ctx.envelope.remote,
            )  # fmt: skip
        if verdict.action == "refuse":
            self.answer(message, ctx, 403, "Forbidden")
            return
        ctx.count(COUNT_AUTH_CHALLENGED)
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        status, text = (407, "Proxy Authentication Required") if proxy else (401, "Unauthorized")
        challenges = self.auth.challenges(realm, time.time(), stale=verdict.stale)
        self.answer(message, ctx, status, text, [(name, value) for value in challenges])

    def busy(self, message: SipMessage, ctx: RouteContext, error: Exception) -> None:
        """The store did not answer in time: 500 with Retry-After (RFC 3261 section 21.5.1), counted and logged."""
        ctx.count(COUNT_STORE_BUSY)
        self.ratelog.log(logging.WARNING, "registrar_busy", "registrar store busy: %s", error)
        self.answer(
            message, ctx, 500, "Server Internal Error (registrar busy)",
            [("Retry-After", str(BUSY_RETRY_AFTER_SECONDS))],
        )  # fmt: skip


def hostport(address: tuple[str, int]) -> str:
    """``HOST:PORT``, an IPv6 host in brackets: how an address is written in a URI."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
