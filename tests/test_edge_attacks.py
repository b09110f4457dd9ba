"""Attacks on sipwire's edge found by an adversarial review, each against a real transport and real workers.

Every test here failed on the code before its fix; the docstring of each says what the attack did.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import pytest

from sipwire.transport.routers.digest import NONCE_DIGITS
from sipwire.transport.sip import parse
from sipwire.transport.sipresponse import build_response
from tests.conftest import RunningTransport, SipClient, run_ctl, sip_request, wait_for
from tests.sipphone import Phone, challenge_params
from tests.wsclient import RawWs


@pytest.mark.parametrize(
    ("headers", "content_length"),
    [
        # A bare LF: a next hop that accepts LF line ends (many do) reads a second Content-Length, smuggled.
        ([("Subject", "hi\nContent-Length: 30")], "0"),
        # A bare CR, the same for CR-tolerant parsers.
        ([("Subject", "hi\rContent-Length: 30")], "0"),
        # A folded Content-Length: the framer reads 0, the copy forwarded said "0 25" and framed nowhere.
        ([], "0\r\n 25"),
    ],
    ids=["bare-lf", "bare-cr", "folded-content-length"],
)
def test_the_proxy_relays_no_header_that_frames_differently_at_the_next_hop(
    start_transport: Callable[..., RunningTransport], headers: list[tuple[str, str]], content_length: str
) -> None:
    """Header text the framer and the parser read one way left the proxy to be read another way by the next hop.

    The proxy copies header lines as parsed; a value holding a bare CR or LF, or a folded Content-Length,
    went upstream as it came, on a connection shared with other users' requests. Such a request is a 400 now.
    """
    upstream = socket.create_server(("127.0.0.1", 0))
    upstream.settimeout(0.5)
    proxy = start_transport(
        "--open-registrar", router="proxy", workers=1,
        upstream=f"sip:127.0.0.1:{upstream.getsockname()[1]};transport=tcp",
    )  # fmt: skip
    crafted = sip_request("OPTIONS", uri="sip:x@example.test", headers=headers, content_length=content_length)
    with upstream, SipClient.connect(proxy) as client:
        client.send(crafted)
        answer = client.read_response()
        assert answer.status == 400, answer.raw
        with pytest.raises(TimeoutError):
            upstream.accept()  # nothing was forwarded


def test_a_binding_made_before_a_restart_never_reaches_a_connection_made_after_it(
    start_transport: Callable[..., RunningTransport],
) -> None:
    """Connection ids restarted at 1 with every transport, while the registrar's bindings and flow-token key persist.

    Alice registered over connection 1; after a restart the first peer to connect (Mallory, no REGISTER, no
    credentials) got connection 1 again and every request for Alice. Signed Route and Via tokens named connection
    ids the same way, so a token learnt before a restart steered requests and responses into a stranger's
    connection. Connection ids are unique across restarts now: Alice's old flow is gone, and Bob is told so.
    """
    first = start_transport("--open-registrar", router="proxy", workers=1)
    with SipClient.connect(first) as alice:
        alice.send(
            sip_request(
                "REGISTER", uri="sip:example.test", call_id="alice-reg",
                headers=[("Contact", "<sip:alice@127.0.0.1:5999;transport=tcp>")],
            ).replace(b"To: <sip:service@127.0.0.1>", b"To: <sip:alice@example.test>")
        )  # fmt: skip
        assert alice.read_response().status == 200
        first.stop()
    second = start_transport("--open-registrar", router="proxy", workers=1, restart_of=first)
    with SipClient.connect(second) as mallory, SipClient.connect(second) as bob:
        mallory.send(b"\r\n\r\n")
        assert mallory.read_exact(2) == b"\r\n"  # Mallory's connection is open before Bob's request
        bob.send(sip_request("OPTIONS", uri="sip:alice@example.test", call_id="for-alice"))
        mallory.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            pytest.fail(f"Mallory received {mallory.sock.recv(65536)[:80]!r}")
        answer = bob.read_response()
        assert answer.status in (480, 503), answer.raw  # Alice's connection is gone; her Contact refuses


def test_a_stranger_in_a_dialog_cannot_relay_through_the_proxy_with_its_route_token(
    start_transport: Callable[..., RunningTransport],
) -> None:
    """A stranger may call a local user; the Record-Route tokens of that dialog then made the proxy relay anywhere.

    An in-dialog request with the proxy's Route (a valid token) followed by a Route of the stranger's choice was
    trusted and sent to that address: an open relay (a PSTN gateway that trusts the proxy, say) for anyone able to
    call one local user. A token naming a connection now sends the request on that connection, the leg it names.
    """
    victim = socket.create_server(("127.0.0.1", 0))
    victim.settimeout(0.5)
    proxy = start_transport(router="proxy", workers=1, users={"alice@sip.test": "alice-secret"})
    with victim, Phone(proxy, "alice@sip.test", "alice-secret") as alice, Phone(proxy, "mallory@evil.test") as mallory:
        assert alice.register().status == 200
        mallory.send(mallory.request("INVITE", "sip:alice@sip.test", call_id="stranger-call"))
        record_routes = alice.read().values("record-route")
        assert len(record_routes) == 2  # the callee's leg, then the caller's (Mallory's own connection)
        gateway = f"sip:+15550100@127.0.0.1:{victim.getsockname()[1]};transport=tcp"
        mallory.send(
            mallory.request(
                "INVITE", gateway, call_id="stranger-call", to="<sip:alice@sip.test>;tag=alice-tag",
                headers=[("Route", f"{record_routes[1]}, <{gateway};lr>")],
            )
        )  # fmt: skip
        with pytest.raises(TimeoutError):
            victim.accept()[0].close()  # nothing relayed to the address Mallory chose
        assert mallory.read().method == "INVITE"  # her own leg's token: the request came back to her


def test_websocket_close_codes_cannot_fill_the_counter_table(start_transport: Callable[..., RunningTransport]) -> None:
    """Each close code a WebSocket peer chose became a counter name (``ws_peer_close.4321``) for good.

    3000-4999 are all valid close codes: a peer closing 2,000 WebSockets with one code each filled the stats
    block's 256 counter entries, and every counter named for the first time after that (a TLS failure, a
    blocked password guesser...) was left out of ``ctl stats``, ``/api/stats`` and ``/metrics``: the attack
    hid what came next. The application range counts under one name now.
    """
    running = start_transport(workers=1, ws="127.0.0.1:0")
    for code in range(4000, 4260):
        with RawWs(running, secure=False) as peer:
            assert peer.upgrade().startswith(b"HTTP/1.1 101")
            peer.send(peer.frame(0x8, code.to_bytes(2, "big")))
            assert peer.read_close_code() == code  # the close handshake is answered with the peer's code
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", content_length="x"))  # a counter named after the WebSockets
        assert client.read_response().status == 400

    def stats() -> dict[str, object] | None:
        figures = json.loads(run_ctl(running, "stats", "--json").stdout)
        return figures if figures["counters"].get("framing_error.bad_content_length") else None

    figures = wait_for(stats, what="the framing error in the stats block")
    assert figures["counters_left_out"] == {"names": 0, "value": 0}
    assert figures["counters"]["ws_peer_close.application"] == 260


def test_every_tls_handshake_failure_a_peer_causes_is_counted(start_transport: Callable[..., RunningTransport]) -> None:
    """A ClientHello record longer than TLS allows failed with two OpenSSL reasons, joined into one counter name.

    ``tls_handshake_failed.data_length_too_long,_record_layer_failure`` is longer than a stats block counter
    name may be: the failure was left out of ``ctl stats``, ``/api/stats`` and ``/metrics``, whatever its count.
    """
    running = start_transport(workers=1)
    with socket.create_connection((running.host, running.tls_port), timeout=5) as peer:
        peer.sendall(b"\x16\x03\x01\xff\xff" + b"\x01" * 300)  # a handshake record of 65535 bytes announced
        assert peer.recv(64)[:1] == b"\x15"  # an alert, then the close

    def stats() -> dict[str, object] | None:
        figures = json.loads(run_ctl(running, "stats", "--json").stdout)
        failed = [name for name in figures["counters"] if name.startswith("tls_handshake_failed.")]
        return figures if failed or figures["counters_left_out"]["names"] else None

    figures = wait_for(stats, what="the TLS failure in the stats block")
    assert figures["counters_left_out"] == {"names": 0, "value": 0}
    assert figures["counters"]["tls_handshake_failed.data_length_too_long"] == 1


#: Where a request of these tests has the byte 0xE9, Latin-1 for "e acute", which is not UTF-8.
LATIN1 = "@E9@"


def _latin1(request: bytes) -> bytes:
    return request.replace(LATIN1.encode(), b"\xe9")


def _register(cseq: int, headers: list[tuple[str, str]]) -> bytes:
    raw = sip_request("REGISTER", cseq, uri="sip:example.test", call_id="latin1", headers=headers)
    return _latin1(raw.replace(b"To: <sip:service@127.0.0.1>", b"To: <sip:alice@example.test>"))


def test_bytes_that_are_not_utf8_get_a_4xx_or_are_kept_never_a_500(
    start_transport: Callable[..., RunningTransport],
) -> None:
    """Header bytes that are not UTF-8 (a Latin-1 User-Agent, as some phones send) reached the registrar's SQLite.

    SQLite keeps UTF-8 text only: such a REGISTER, or any request to a Request-URI with such a byte, made the
    router raise and was answered 500 (``router_errors``), so that phone could never register.
    """
    proxy = start_transport("--open-registrar", router="proxy", workers=1)
    contact = ("Contact", "<sip:alice@127.0.0.1:5999;transport=tcp>")
    with SipClient.connect(proxy) as client:
        client.send(_register(1, [contact, ("User-Agent", f"T{LATIN1}l{LATIN1}phone 1.0")]))
        assert client.read_response().status == 200
        bad_contacts = [f"<sip:al{LATIN1}@127.0.0.1:5999>", f"{contact[1]};+sip.instance={LATIN1}"]
        for cseq, value in enumerate(bad_contacts, start=2):
            client.send(_register(cseq, [("Contact", value)]))
            answer = client.read_response()
            assert answer.status == 400, answer.raw
        client.send(_latin1(sip_request("OPTIONS", uri=f"sip:al{LATIN1}@example.test")))
        assert 400 <= client.read_response().status < 500
    assert "router_errors" not in proxy.counters()


def test_tokens_and_credentials_that_are_not_ascii_are_refused_not_a_500(
    start_transport: Callable[..., RunningTransport],
) -> None:
    """``hmac.compare_digest`` raises TypeError on text that is not ASCII: a flow token, a nonce or a digest
    response with an "é" made the proxy's router raise: 500 to a request, a router error for a response."""
    proxy = start_transport(router="proxy", workers=1, users={"alice@sip.test": "alice-secret"})
    forged_route = f"<sip:127.0.0.1:{proxy.port};transport=tcp;lr;swr=1.é>"  # a Record-Route token of ours, forged
    credentials = (
        'Digest username="alice", realm="sip.test", uri="{uri}", response="{response}", nonce="{nonce}", '
        'qop=auth, nc=00000001, cnonce="c"'
    )
    with Phone(proxy, "alice@sip.test", "alice-secret") as alice:
        alice.send(alice.request("MESSAGE", "sip:alice@sip.test", headers=[("Route", forged_route)]))
        assert alice.read().status == 403
        forged_nonce = credentials.format(uri="sip:alice@sip.test", response="0" * 64, nonce="é" * NONCE_DIGITS)
        alice.send(alice.request("MESSAGE", "sip:alice@sip.test", headers=[("Proxy-Authorization", forged_nonce)]))
        assert alice.read().status == 407  # not a nonce of ours: challenged again
        alice.send(alice.request("REGISTER", "sip:sip.test"))
        nonce = challenge_params(alice.read().header_lines("www-authenticate")[0])["nonce"]
        guess = credentials.format(uri="sip:sip.test", response="é" * 64, nonce=nonce)
        alice.send(alice.request("REGISTER", "sip:sip.test", headers=[("Authorization", guess)]))
        assert alice.read().status == 403  # a response that cannot be right: a wrong password
        forged_via = "SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bKsw1;swf=1.é"
        alice.send(build_response(parse(alice.request("MESSAGE", "sip:b@h")), 200, "OK").replace(
            b"Via: ", f"Via: {forged_via}\r\nVia: ".encode(), 1
        ))  # fmt: skip
        wait_for(lambda: proxy.counters().get("proxy.responses_dropped"), what="the forged response dropped")
    assert "router_errors" not in proxy.counters()


def test_a_route_without_its_closing_bracket_is_a_400(start_transport: Callable[..., RunningTransport]) -> None:
    """``Route: <sip:host;lr`` (no ``>``) made the proxy's router raise when that Route was the next hop: a 500."""
    proxy = start_transport("--open-registrar", router="proxy", workers=1)
    with SipClient.connect(proxy) as client:
        client.send(sip_request("OPTIONS", uri="sip:x@example.test", headers=[("Route", "<sip:127.0.0.1:9;lr")]))
        answer = client.read_response()
    assert (answer.status, answer.reason) == (400, "Bad Request (Route: unclosed '<' in '<sip:127.0.0.1:9;lr')")
    assert "router_errors" not in proxy.counters()
