"""Dialogs through the proxy: 407, Request-URI rewrite, Record-Route flow tokens, in-dialog routing, 482.

Two scripted phones on their own connections register (digest); their
Contacts name an address nobody listens on, so only the connection they
registered on reaches them, as with a phone behind NAT or baresip's
ephemeral TCP port. In-dialog requests reach them only because the proxy
record-routed each leg with that leg's connection.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from sipwire.transport.sip import SipMessage
from sipwire.transport.sipresponse import build_response
from tests.conftest import RunningTransport
from tests.sipphone import Phone, digest_credentials

StartTransport = Callable[..., RunningTransport]
USERS = {"alice@sip.test": "alice-secret", "bob@sip.test": "bob-secret", "carol@sip.test": "carol-secret"}


@pytest.fixture
def proxy(start_transport: StartTransport) -> RunningTransport:
    return start_transport(router="proxy", workers=2, users=USERS, upstream="sip:127.0.0.1:9;transport=tcp")


@pytest.fixture
def phones(proxy: RunningTransport) -> Iterator[tuple[Phone, Phone]]:
    alice = Phone(proxy, "alice@sip.test", USERS["alice@sip.test"])
    bob = Phone(proxy, "bob@sip.test", USERS["bob@sip.test"])
    assert alice.register().status == 200
    assert bob.register().status == 200
    yield alice, bob
    alice.close()
    bob.close()


def _authorized(alice: Phone, method: str, uri: str, call_id: str, headers: list[tuple[str, str]]) -> str:
    """Send ``method`` once without credentials (407, ACKed when an INVITE), then with them; the branch used."""
    first_branch = f"z9hG4bK-{call_id}-1"
    alice.send(alice.request(method, uri, call_id=call_id, cseq=1, branch=first_branch, headers=headers))
    challenge = alice.read()
    assert challenge.status == 407, challenge.start_line
    if method == "INVITE":
        to = challenge.header("to") or ""
        alice.send(alice.request("ACK", uri, call_id=call_id, cseq=1, branch=first_branch, to=to))
    credentials = digest_credentials(
        challenge.header_lines("proxy-authenticate")[0], method, uri, alice.user, alice.password
    )
    branch = f"z9hG4bK-{call_id}-2"
    auth = [*headers, ("Proxy-Authorization", credentials)]
    alice.send(alice.request(method, uri, call_id=call_id, cseq=2, branch=branch, headers=auth))
    return branch


def _answer(request: SipMessage, status: int, contact: str, tag: str) -> bytes:
    headers = [("Record-Route", value) for value in request.values("record-route")]
    return build_response(request, status, "OK", to_tag=tag, extra_headers=[*headers, ("Contact", f"<{contact}>")])


def test_a_call_goes_through_with_record_route_and_in_dialog_requests_use_each_legs_connection(
    proxy: RunningTransport, phones: tuple[Phone, Phone]
) -> None:
    alice, bob = phones
    contact = [("Contact", f"<{alice.contact}>")]
    _authorized(alice, "INVITE", "sip:bob@sip.test", "call-1", contact)
    invite = bob.read()
    assert invite.method == "INVITE"
    assert invite.uri == bob.contact  # rewritten to the registered contact
    assert invite.header("proxy-authorization") is None  # our own credentials do not travel on
    record_routes = invite.values("record-route")
    assert len(record_routes) == 2 and all(";lr;swr=" in value for value in record_routes)
    bob.send(_answer(invite, 200, bob.contact, "bob-tag"))
    ok = alice.read()
    assert ok.status == 200 and ok.values("record-route") == record_routes
    to_bob = ok.header("to") or ""
    route_set = ", ".join(reversed(record_routes))
    alice.send(alice.request("ACK", bob.contact, call_id="call-1", cseq=2, to=to_bob, headers=[("Route", route_set)]))
    ack = bob.read()
    assert (ack.method, ack.uri, ack.header("route")) == ("ACK", bob.contact, None)
    bye = bob.request(
        "BYE", alice.contact, call_id="call-1", cseq=1, from_tag="bob-tag", to="<sip:alice@sip.test>;tag=ft1",
        headers=[("Route", ", ".join(record_routes))],
    )  # fmt: skip
    bob.send(bye)
    got_bye = alice.read()
    assert (got_bye.method, got_bye.uri) == ("BYE", alice.contact)
    alice.send(build_response(got_bye, 200, "OK"))
    assert bob.read().status == 200
    counters = proxy.counters()
    assert counters["proxy.in_dialog"] == 2
    assert counters["proxy.record_routed"] == 1
    assert counters["proxy.ack_absorbed"] == 1


def test_a_tampered_route_token_is_refused(proxy: RunningTransport, phones: tuple[Phone, Phone]) -> None:
    alice, bob = phones
    _authorized(alice, "INVITE", "sip:bob@sip.test", "call-2", [("Contact", f"<{alice.contact}>")])
    record_routes = bob.read().values("record-route")
    # Tokens of call-2's dialog used for another Call-ID (to steer a BYE into Alice's connection).
    bye = bob.request(
        "BYE", alice.contact, call_id="another-call", cseq=1, from_tag="bob-tag", to="<sip:alice@sip.test>;tag=ft1",
        headers=[("Route", ", ".join(record_routes))],
    )  # fmt: skip
    bob.send(bye)
    refused = bob.read()
    assert (refused.status, refused.reason) == (403, "Forbidden (Route token not valid for this dialog)")
    alice.nothing()


def test_cancel_follows_the_invite_with_its_branch(proxy: RunningTransport, phones: tuple[Phone, Phone]) -> None:
    alice, bob = phones
    branch = _authorized(alice, "INVITE", "sip:bob@sip.test", "call-3", [("Contact", f"<{alice.contact}>")])
    invite = bob.read()
    alice.send(alice.request("CANCEL", "sip:bob@sip.test", call_id="call-3", cseq=2, branch=branch))
    cancel = bob.read()
    assert cancel.method == "CANCEL" and cancel.uri == bob.contact
    assert cancel.values("via")[0] == invite.values("via")[0]  # the same branch: the callee matches them


def test_a_preloaded_route_to_the_proxy_is_consumed(proxy: RunningTransport, phones: tuple[Phone, Phone]) -> None:
    alice, bob = phones
    route = ("Route", f"<sip:127.0.0.1:{proxy.port};transport=tcp;lr>")
    _authorized(alice, "MESSAGE", "sip:bob@sip.test", "msg-1", [route])
    message = bob.read()
    assert message.method == "MESSAGE" and message.header("route") is None and message.header("record-route") is None


def test_unknown_unregistered_and_foreign_targets(proxy: RunningTransport, phones: tuple[Phone, Phone]) -> None:
    alice, bob = phones
    _authorized(alice, "MESSAGE", "sip:nobody@sip.test", "msg-2", [])
    assert alice.read().status == 404
    _authorized(alice, "MESSAGE", "sip:carol@sip.test", "msg-3", [])
    assert alice.read().status == 480
    with Phone(proxy, "mallory@foreign.test") as mallory:
        mallory.send(mallory.request("MESSAGE", "sip:someone@elsewhere.test", call_id="relay"))
        denied = mallory.read()
        assert (denied.status, denied.reason) == (403, "Forbidden (relaying denied)")
        mallory.send(mallory.request("MESSAGE", "sip:bob@sip.test", call_id="inbound"))  # a call from outside
        assert bob.read().call_id == "inbound"
    assert proxy.counters()["proxy.relay_denied"] == 1


def test_a_request_that_comes_back_unchanged_is_a_loop_482(start_transport: StartTransport) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = start_transport(
        "--open-registrar", router="proxy", workers=2, tcp=f"127.0.0.1:{port}", upstream=f"sip:127.0.0.1:{port}"
    )
    with Phone(proxy, "alice@foreign.test") as alice:
        alice.send(alice.request("OPTIONS", "sip:someone@elsewhere.test", call_id="loop-1"))
        answer = alice.read()
    assert (answer.status, answer.reason) == (482, "Loop Detected")
    assert proxy.counters()["proxy.loop_detected"] == 1
