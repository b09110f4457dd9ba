"""The built-in ``proxy`` router: stateless forwarding, registrar flows, outcome-driven 503/480."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from sipwire.config import Settings
from sipwire.transport.framing import Framer
from sipwire.transport.routers.sqlitestore import open_store
from sipwire.transport.sip import SipMessage, parse
from sipwire.transport.sipresponse import build_response
from tests.conftest import RunningTransport, wait_for

CLIENT_VIA = "SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKclient1;rport"


def request(method: str, uri: str, call_id: str, *, extra: str = "", max_forwards: int = 70) -> bytes:
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: {CLIENT_VIA}\r\n"
        f"Max-Forwards: {max_forwards}\r\n"
        f"From: <sip:bob@example.test>;tag=b1\r\n"
        f"To: <{uri}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"{extra}"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def read_message(sock: socket.socket, framer: Framer, timeout: float = 5.0) -> SipMessage:
    sock.settimeout(timeout)
    while True:
        for event in framer.feed(sock.recv(65536)):
            if isinstance(event, bytes):
                return parse(event)


class Upstream:
    """A loopback SIP peer that answers every request with 200 and remembers what it saw."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[SipMessage] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        framer = Framer()
        with conn:
            conn.settimeout(10)
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for event in framer.feed(data):
                    if isinstance(event, bytes):
                        message = parse(event)
                        self.received.append(message)
                        conn.sendall(build_response(message, 200, "OK"))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    peer = Upstream()
    yield peer
    peer.close()


def test_request_forwarded_upstream_and_response_relayed(
    start_transport: Callable[..., RunningTransport], upstream: Upstream
) -> None:
    proxy = start_transport(
        "--open-registrar", router="proxy", upstream=f"sip:127.0.0.1:{upstream.port};transport=tcp", workers=2
    )
    with proxy.connect() as client:
        client_port = client.getsockname()[1]
        client.sendall(request("OPTIONS", "sip:service@example.test", "fwd-1"))
        response = read_message(client, Framer())
    assert response.status == 200
    # The proxy's own Via is gone; the client's gained rport and received (RFC 3581).
    assert response.header_lines("via") == [
        f"SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKclient1;rport={client_port};received=127.0.0.1"
    ]
    seen = upstream.received[0]
    vias = seen.values("via")
    assert len(vias) == 2
    assert re.search(r";swf=\d+\.[0-9a-f]{32}$", vias[0]) and vias[0].startswith("SIP/2.0/TCP 127.0.0.1:")
    assert "received=127.0.0.1" in vias[1] and ";rport=" in vias[1]
    assert seen.header("max-forwards") == "69"
    assert seen.call_id == "fwd-1"


def test_refused_forward_is_answered_503_from_the_outcome(start_transport: Callable[..., RunningTransport]) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    proxy = start_transport(
        "--open-registrar", router="proxy", upstream=f"sip:127.0.0.1:{port};transport=tcp", workers=1
    )
    with proxy.connect() as client:
        client.sendall(request("OPTIONS", "sip:service@example.test", "refused-1"))
        response = read_message(client, Framer())
    assert response.status == 503
    assert response.reason == "Service Unavailable (refused)"
    assert proxy.counters()["write.refused"] == 1


def test_registered_user_is_reached_over_its_own_connection(start_transport: Callable[..., RunningTransport]) -> None:
    proxy = start_transport("--open-registrar", router="proxy", workers=2)
    alice_framer, bob_framer = Framer(), Framer()
    with proxy.connect() as alice, proxy.connect() as bob:
        alice.sendall(
            request("REGISTER", "sip:alice@example.test", "reg-1", extra="Contact: <sip:alice@127.0.0.9:5062>\r\n")
        )
        registered = read_message(alice, alice_framer)
        assert registered.status == 200
        assert registered.header(
            "contact",
        ).startswith("<sip:alice@127.0.0.9:5062>;expires=")  # type: ignore[union-attr]
        bob.sendall(request("MESSAGE", "sip:alice@example.test", "to-alice-1"))
        delivered = read_message(alice, alice_framer)
        assert delivered.method == "MESSAGE" and delivered.call_id == "to-alice-1"
        alice.sendall(build_response(delivered, 200, "OK"))
        relayed = read_message(bob, bob_framer)
    assert relayed.status == 200 and relayed.call_id == "to-alice-1"


INSTANCE = '"<urn:uuid:00000000-0000-1000-8000-00aa00bb00cc>"'


def test_a_flow_goes_with_its_connection_and_max_forwards_zero_gives_483(
    start_transport: Callable[..., RunningTransport],
) -> None:
    proxy = start_transport("--open-registrar", router="proxy", workers=2)
    alice = proxy.connect()
    flow = f"Contact: <sip:carol@127.0.0.9>;+sip.instance={INSTANCE};reg-id=1\r\n"
    alice.sendall(request("REGISTER", "sip:carol@example.test", "reg-2", extra=flow))
    assert read_message(alice, Framer()).status == 200
    alice.close()
    # The transport announces the close to every worker (CONNECTIONS_CLOSED); one removes the flow.
    wait_for(lambda: proxy.counters().get("registrar.flows_closed") == 1, what="the flow's binding removed")
    with proxy.connect() as bob:
        framer = Framer()
        bob.sendall(request("MESSAGE", "sip:carol@example.test", "to-carol"))
        gone = read_message(bob, framer)
        assert (gone.status, gone.reason) == (404, "Not Found (no binding and no upstream)")
        bob.sendall(request("OPTIONS", "sip:x@example.test", "hops", max_forwards=0))
        assert read_message(bob, framer).status == 483


def test_a_plain_binding_outlives_its_connection_and_is_reached_at_its_contact(
    start_transport: Callable[..., RunningTransport],
) -> None:
    """Without reg-id a binding is RFC 3261's: once its connection is gone, the Contact's address is used."""
    proxy = start_transport("--open-registrar", router="proxy", workers=2)
    with socket.create_server(("127.0.0.9", 0)) as phone:
        port = phone.getsockname()[1]
        registration = proxy.connect()
        contact = f"Contact: <sip:dave@127.0.0.9:{port};transport=tcp>\r\n"
        registration.sendall(request("REGISTER", "sip:dave@example.test", "reg-3", extra=contact))
        assert read_message(registration, Framer()).status == 200
        registration.close()
        store = open_store(Settings(instance="test0", state_dir=str(proxy.control_path.parent.parent)))
        try:  # the workers learnt of the close: the binding no longer names a connection
            wait_for(lambda: store.registrations(0.0)[0].conn_id == 0, what="the binding released its connection")
        finally:
            store.close()
        with proxy.connect() as bob:
            bob.sendall(request("MESSAGE", "sip:dave@example.test", "to-dave"))
            phone.settimeout(5.0)
            peer, _ = phone.accept()
            with peer:
                delivered = read_message(peer, Framer())
    assert delivered.uri == f"sip:dave@127.0.0.9:{port};transport=tcp" and delivered.call_id == "to-dave"
    assert proxy.counters().get("registrar.flows_closed", 0) == 0


def _connection_ids(proxy: RunningTransport) -> dict[int, int]:
    """Remote port to connection id, for the connections the proxy has open."""
    listing = proxy.control("connections")["connections"]
    return {int(c["remote"].rpartition(":")[2]): c["id"] for c in listing}


def _forged_response(top_via: str, second_via: str, call_id: str) -> bytes:
    return (
        "SIP/2.0 200 OK\r\n"
        f"Via: {top_via}\r\nVia: {second_via}\r\n"
        "From: <sip:mallory@example.test>;tag=m\r\nTo: <sip:alice@example.test>;tag=a\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def test_forged_responses_reach_no_other_user_and_no_address(start_transport: Callable[..., RunningTransport]) -> None:
    """A response is relayed only through a Via this proxy made: ids and addresses a peer names are not trusted."""
    proxy = start_transport("--open-registrar", router="proxy", workers=1)
    with proxy.connect() as alice, proxy.connect() as mallory, socket.create_server(("127.0.0.1", 0)) as victim:
        wait_until = time.monotonic() + 5
        while len(_connection_ids(proxy)) < 2 and time.monotonic() < wait_until:
            time.sleep(0.02)
        alice_id = _connection_ids(proxy)[alice.getsockname()[1]]
        victim_port = victim.getsockname()[1]
        victim_via = f"SIP/2.0/TCP 127.0.0.1:{victim_port};branch=z9hG4bKv;received=127.0.0.1"
        forgeries = [
            (f"SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKf1;swc={alice_id}", victim_via),  # the old bare id
            (f"SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKf2;swf={alice_id}.{'0' * 32}", victim_via),  # a made-up MAC
            ("SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bKf3", victim_via),  # no token: nothing to relay to
        ]
        for index, (top, second) in enumerate(forgeries):
            mallory.sendall(_forged_response(top, second, f"forged-{index}"))
        # A request mallory really sent through the proxy gives a genuine token; swapping its id for alice's
        # breaks the MAC.
        mallory.sendall(request("OPTIONS", "sip:nobody@example.test", "probe"))
        assert read_message(mallory, Framer()).status == 404
        alice.settimeout(1.0)
        with pytest.raises(TimeoutError):
            alice.recv(65536)
        victim.settimeout(0.5)
        with pytest.raises(TimeoutError):
            victim.accept()
    assert "no flow token of this proxy" in proxy.log_text()


def test_a_genuine_token_does_not_work_for_another_connection(
    start_transport: Callable[..., RunningTransport], upstream: Upstream
) -> None:
    proxy = start_transport(
        "--open-registrar", router="proxy", upstream=f"sip:127.0.0.1:{upstream.port};transport=tcp", workers=1
    )
    with proxy.connect() as alice, proxy.connect() as mallory:
        mallory.sendall(request("OPTIONS", "sip:service@example.test", "genuine"))
        assert read_message(mallory, Framer()).status == 200
        own_via, client_via = upstream.received[0].values("via")
        alice_id = _connection_ids(proxy)[alice.getsockname()[1]]
        token = re.search(r"swf=(\d+)\.", own_via)
        assert token is not None
        stolen = own_via.replace(f"swf={token.group(1)}.", f"swf={alice_id}.")
        mallory.sendall(_forged_response(stolen, client_via, "stolen"))
        alice.settimeout(1.0)
        with pytest.raises(TimeoutError):
            alice.recv(65536)
