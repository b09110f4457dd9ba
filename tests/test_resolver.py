"""Name resolution off the worker loop: caches, timeouts, bounds; and through a real transport's proxy router."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from sipwire.transport.resolver import Failure, Resolver, ResolverLimits, first_address
from tests.conftest import RunningTransport, SipClient, sip_request, wait_for

LIMITS = ResolverLimits(
    threads=2, timeout=0.3, positive_seconds=60.0, negative_seconds=60.0, cache_entries=3, max_pending=2
)


class Loop:
    """The worker loop's use of a resolver: select on its fd, collect, record the answers."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.selector = selectors.DefaultSelector()
        self.selector.register(resolver.wake_fd, selectors.EVENT_READ)
        self.answers: dict[str, str | Failure] = {}

    def waiter(self, name: str) -> Callable[[str | Failure], None]:
        return lambda answer: self.answers.__setitem__(name, answer)

    def run_until(self, names: set[str], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not names <= self.answers.keys():
            assert time.monotonic() < deadline, f"no answer for {names - self.answers.keys()}"
            wait = self.resolver.seconds_to_next_deadline()
            self.selector.select(min(wait, 0.5) if wait is not None else 0.5)
            self.resolver.collect()


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    released = threading.Event()
    yield released
    released.set()


def _slow(gate: threading.Event, calls: list[str]) -> Callable[[str, int], str | Failure]:
    def resolve(host: str, port: int) -> str | Failure:
        calls.append(host)
        gate.wait(5.0)
        return "192.0.2.7" if host != "broken.test" else Failure(f"cannot resolve {host!r}: no such name")

    return resolve


def test_a_lookup_never_blocks_the_loop_and_is_cached(gate: threading.Event) -> None:
    calls: list[str] = []
    resolver = Resolver(LIMITS, _slow(gate, calls))
    loop = Loop(resolver)
    started = time.monotonic()
    resolver.lookup("sip.test", 5060, loop.waiter("a"))
    resolver.lookup("SIP.test", 5060, loop.waiter("b"))  # joins the running lookup (names are case-insensitive)
    resolver.collect()
    assert time.monotonic() - started < 0.1  # the loop went on while the lookup waits on its thread
    assert loop.answers == {}
    gate.set()
    loop.run_until({"a", "b"})
    assert loop.answers == {"a": "192.0.2.7", "b": "192.0.2.7"}
    assert calls == ["sip.test"]
    assert resolver.cached("sip.test", 5060) == "192.0.2.7"
    resolver.close()


def test_failures_are_cached_too(gate: threading.Event) -> None:
    gate.set()
    calls: list[str] = []
    resolver = Resolver(LIMITS, _slow(gate, calls))
    loop = Loop(resolver)
    resolver.lookup("broken.test", 5060, loop.waiter("a"))
    loop.run_until({"a"})
    assert isinstance(loop.answers["a"], Failure) and "broken.test" in loop.answers["a"].reason
    assert resolver.cached("broken.test", 5060) == loop.answers["a"]
    assert resolver.failures == 1
    resolver.close()


def test_a_slow_lookup_fails_its_waiters_at_the_timeout(gate: threading.Event) -> None:
    calls: list[str] = []
    resolver = Resolver(LIMITS, _slow(gate, calls))
    loop = Loop(resolver)
    started = time.monotonic()
    resolver.lookup("slow.test", 5060, loop.waiter("a"))
    loop.run_until({"a"})
    waited = time.monotonic() - started
    answer = loop.answers["a"]
    assert isinstance(answer, Failure) and "longer than 0.3s" in answer.reason
    assert 0.25 <= waited < 2.0
    assert resolver.timeouts == 1
    gate.set()  # the late answer still fills the cache
    wait_for(lambda: (resolver.collect(), resolver.cached("slow.test", 5060))[1] == "192.0.2.7", what="late answer")
    resolver.close()


def test_pending_lookups_and_the_cache_are_bounded(gate: threading.Event) -> None:
    calls: list[str] = []
    resolver = Resolver(LIMITS, _slow(gate, calls))
    loop = Loop(resolver)
    for name in ("a.test", "b.test", "c.test"):
        resolver.lookup(name, 5060, loop.waiter(name))
    refused = loop.answers["c.test"]  # max_pending 2: answered at once, no thread used
    assert isinstance(refused, Failure) and "dns_max_pending" in refused.reason
    wait_for(lambda: len(calls) == 2, what="both lookups on their threads")  # each thread records its call
    assert sorted(calls) == ["a.test", "b.test"]
    gate.set()
    loop.run_until({"a.test", "b.test"})
    for name in ("d.test", "e.test"):
        resolver.lookup(name, 5060, loop.waiter(name))
        loop.run_until({name})
    # cache_entries 3: the least recent of a.test and b.test (they finished in either order) went
    assert [resolver.cached(name, 5060) for name in ("a.test", "b.test")].count(None) == 1
    assert resolver.cached("e.test", 5060) == "192.0.2.7"
    resolver.lookup("x" * 300, 5060, loop.waiter("long"))
    assert isinstance(loop.answers["long"], Failure)
    resolver.close()


def test_first_address_answers_localhost_and_fails_a_name_that_does_not_exist() -> None:
    assert first_address("localhost", 5060) in ("127.0.0.1", "::1")
    failure = first_address("no-such-host.invalid", 5060)
    assert isinstance(failure, Failure) and "no-such-host.invalid" in failure.reason


# -- through a real transport: the proxy router forwards to an upstream given by name ----------------


def _options(call: str) -> bytes:
    return sip_request("OPTIONS", uri="sip:someone@example.test", call_id=call)


def test_a_proxy_upstream_by_name_is_resolved_and_reached(start_transport: Callable[..., RunningTransport]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        port = upstream.getsockname()[1]
        running = start_transport(
            "--open-registrar", router="proxy", upstream=f"sip:localhost:{port};transport=tcp", workers=1
        )
        with SipClient.connect(running) as client:
            client.send(_options("by-name"))
            upstream.settimeout(5.0)
            peer, _ = upstream.accept()
            with peer:
                peer.settimeout(5.0)
                data = peer.recv(65536)
        assert data.startswith(b"OPTIONS sip:someone@example.test SIP/2.0\r\n")
        assert b"Call-ID: by-name" in data


def test_an_unresolvable_upstream_is_answered_503_and_others_are_served(
    start_transport: Callable[..., RunningTransport],
) -> None:
    running = start_transport(
        "--open-registrar", router="proxy", upstream="sip:no-such-host.invalid:5070;transport=tcp", workers=1
    )
    with SipClient.connect(running) as client:
        client.send(_options("unresolvable"))
        response = client.read_response()
        assert response.status == 503
        assert "unresolvable" in response.reason
        client.send(_options("again"))  # answered from the negative cache, the same way
        assert client.read_response().status == 503
        client.send(sip_request("REGISTER", call_id="local"))  # answered by the worker itself, as ever
        assert client.read_response().status == 200
