"""Operator-style routers for the integration tests (``--router tests.routers_for_tests:NAME``).

Each one is written the way an operator would write a router: plain
functions over :class:`~transport.routing.RouteContext`. They report what
the transport told them (write-job outcomes) back to the test over SIP,
so the tests see exactly what a router sees.

Request headers drive them:

* ``X-Sleep: SECONDS`` (``slow``): sleep, then answer like ``responder``.
* ``X-Target-Port``, ``X-Target-Transport``, ``X-Payload-Bytes``
  (``send_and_report``): send a write job to 127.0.0.1:PORT and answer the
  request, once the outcome is known, with ``200 <result label>``;
  ``X-Failures-Only: yes`` asks for the outcome with ``failures_only``.
* ``X-Target-Conn`` (``send_on_and_report``): the same for a job naming a
  connection id.
* ``X-Gate``, ``X-Report-Port`` (``gated_reply``): wait until the file
  ``X-Gate`` exists, reply on the request's own connection, and send the
  reply's outcome label to the test's listener at 127.0.0.1:PORT.
* ``crash``: raise on every message, with the Call-ID in the exception text.
* ``corrupt_channel``: a request with ``X-Corrupt: yes`` makes the worker put a
  record of an unknown kind on its channel to the transport (a worker bug, as
  the transport sees it); any other request is answered like ``responder``.
* ``tls_facts`` (no request header): answer ``200`` with the envelope's TLS
  facts (version, cipher, SNI, peer subject and expiry) in ``X-Tls-*`` headers.
"""

from __future__ import annotations

import os
import time

from sipwire.transport.routers import responder
from sipwire.transport.routing import Destination, Outcome, RouteContext
from sipwire.transport.sip import SipMessage
from sipwire.transport.sipresponse import build_response

#: Upper bound on any wait a test asks for, so a broken test cannot hang a worker.
MAX_WAIT_SECONDS = 10.0
LOOPBACK = "127.0.0.1"


def _report_headers(outcome: Outcome) -> list[tuple[str, str]]:
    return [
        ("X-Outcome", outcome.result.label),
        ("X-Outcome-Reason", outcome.reason.replace("\r", " ").replace("\n", " ")),
        ("X-Outcome-Conn", str(outcome.conn_id)),
    ]


def _answer_with_outcome(message: SipMessage, ctx: RouteContext, outcome: Outcome) -> None:
    response = build_response(
        message, 200, outcome.result.label, extra_headers=_report_headers(outcome), via_source=ctx.envelope.remote
    )
    ctx.reply(response)


def slow(message: SipMessage, ctx: RouteContext) -> None:
    """Sleep ``X-Sleep`` seconds (bounded), then answer like the responder."""
    delay = float(message.header("x-sleep") or 0)
    time.sleep(min(max(delay, 0.0), MAX_WAIT_SECONDS))
    responder.route(message, ctx)


def send_and_report(message: SipMessage, ctx: RouteContext) -> None:
    """Send a write job to 127.0.0.1:``X-Target-Port``; answer with its outcome."""
    if not message.is_request or message.method == "ACK":
        return
    port = int(message.header("x-target-port") or 0)
    transport = message.header("x-target-transport") or "tcp"
    size = int(message.header("x-payload-bytes") or 0)
    payload = b"P" * size if size else f"PROBE {message.call_id} {message.header('cseq')}\r\n".encode()
    ctx.send(
        Destination(transport, LOOPBACK, port),
        payload,
        on_outcome=lambda outcome: _answer_with_outcome(message, ctx, outcome),
        failures_only=message.header("x-failures-only") == "yes",
    )


def send_on_and_report(message: SipMessage, ctx: RouteContext) -> None:
    """Send a write job on connection ``X-Target-Conn``; answer with its outcome."""
    if not message.is_request or message.method == "ACK":
        return
    target = int(message.header("x-target-conn") or 0)
    ctx.send_on(
        target,
        b"SEND-ON PROBE\r\n",
        on_outcome=lambda outcome: _answer_with_outcome(message, ctx, outcome),
    )


def gated_reply(message: SipMessage, ctx: RouteContext) -> None:
    """Wait for the file ``X-Gate``, reply, and report the reply's outcome to ``X-Report-Port``."""
    if not message.is_request or message.method == "ACK":
        return
    gate = message.header("x-gate") or ""
    report_port = int(message.header("x-report-port") or 0)
    deadline = time.monotonic() + MAX_WAIT_SECONDS
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)

    def report(outcome: Outcome) -> None:
        line = f"OUTCOME {outcome.result.label} {outcome.conn_id}\r\n".encode()
        ctx.send(Destination("tcp", LOOPBACK, report_port), line)

    ctx.reply(build_response(message, 200, "OK", via_source=ctx.envelope.remote), on_outcome=report)


def tls_facts(message: SipMessage, ctx: RouteContext) -> None:
    """Answer 200 with the TLS facts the worker got in the envelope (``X-Tls-*`` headers)."""
    if not message.is_request or message.method == "ACK":
        return
    envelope = ctx.envelope
    tls = envelope.tls
    facts = [
        ("X-Transport", envelope.transport),
        ("X-Tls", "yes" if tls is not None else "no"),
        ("X-Tls-Version", tls.version if tls else ""),
        ("X-Tls-Cipher", tls.cipher if tls else ""),
        ("X-Tls-Server-Name", tls.server_name if tls else ""),
        ("X-Tls-Peer-Subject", tls.peer_subject if tls else ""),
        ("X-Tls-Peer-Not-After", tls.peer_not_after if tls else ""),
    ]
    ctx.reply(build_response(message, 200, "OK", extra_headers=facts, via_source=envelope.remote))


def crash(message: SipMessage, ctx: RouteContext) -> None:
    """Raise on every message, quoting peer text (the Call-ID) as a buggy router would."""
    raise ValueError(f"cannot route call {message.call_id}")


def corrupt_channel(message: SipMessage, ctx: RouteContext) -> None:
    """On ``X-Corrupt: yes``, queue bytes no record kind has on the worker's channel (it reaches into the
    worker only because a real router cannot break the channel: this stands for a bug in the worker)."""
    if message.header("x-corrupt") != "yes":
        responder.route(message, ctx)
        return
    worker = ctx._sender  # the Worker: the one Sender there is
    channel = worker._channel_now()  # type: ignore[attr-defined]
    channel.out.append(b"\xff\x00\x00\x00\x00")
