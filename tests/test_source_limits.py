"""Per-source limits over real sockets: connections per address, connect rate, request rate, allow-list."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sipwire.config import Settings
from sipwire.transport.sources import SourceLimits, TokenBucket
from tests.conftest import RunningTransport, SipClient, sip_request, wait_for, write_config
from tests.console_process import RunningConsole, console_starter

NOT_EXEMPT = {"source_limits_allow": ""}  # loopback is allow-listed by default: these tests are the peers


def _closed_by_server(sock: socket.socket, timeout: float = 2.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[Callable[..., RunningConsole]]:
    yield from console_starter(tmp_path)


def test_connections_per_address_are_capped(
    start_transport: Callable[..., RunningTransport],
    start_console: Callable[..., RunningConsole],
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, max_connections_per_ip=3, **NOT_EXEMPT)
    running = start_transport("--config", str(config), workers=1)
    kept = [running.connect() for _ in range(3)]
    wait_for(lambda: running.control("stats")["connections"] == 3, what="three connections open")
    extra = [running.connect() for _ in range(2)]
    assert all(_closed_by_server(sock) for sock in extra)
    assert running.counters()["refused.connections_per_ip"] == 2
    console = start_console(running)  # operators see it on the overview's Edge protection panel
    with console.client() as browser:
        wait_for(
            lambda: "refused.connections_per_ip" in browser.get("/").text.partition('data-testid="edge"')[2],
            what="the refusals on the console's overview",
        )
    kept[0].close()  # room again once one closes
    wait_for(lambda: running.control("stats")["connections"] == 2, what="the close seen")
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", call_id="room-again"))
        assert client.read_response().status == 200
    for sock in kept[1:] + extra:
        sock.close()


def test_a_connection_flood_from_one_address_is_refused(
    start_transport: Callable[..., RunningTransport], tmp_path: Path
) -> None:
    config = write_config(tmp_path, new_connections_per_ip=2, **NOT_EXEMPT)  # a burst of 4, then 2/s
    running = start_transport("--config", str(config), workers=1)
    socks = [running.connect() for _ in range(12)]
    refused = sum(_closed_by_server(sock, 1.0) for sock in socks)
    assert refused >= 6  # 12 within well under a second: the burst and at most a token or two more get in
    assert running.counters()["refused.connection_rate"] == refused
    for sock in socks:
        sock.close()


def test_requests_over_the_rate_get_503_with_retry_after(
    start_transport: Callable[..., RunningTransport], tmp_path: Path
) -> None:
    config = write_config(tmp_path, requests_per_ip=5, **NOT_EXEMPT)  # a burst of 10, then 5/s
    running = start_transport("--config", str(config), workers=1)
    with SipClient.connect(running) as client:
        client.send(b"".join(sip_request("OPTIONS", call_id=f"burst-{i}") for i in range(30)))
        answers = [client.read_response() for _ in range(30)]
    limited = [answer for answer in answers if answer.status == 503]
    assert 15 <= len(limited) <= 20
    assert {answer.status for answer in answers} == {200, 503}
    assert all(answer.header("retry-after") == "1" for answer in limited)
    assert all(answer.reason == "Service Unavailable (rate limit)" for answer in limited)
    assert running.counters()["limited.request_rate"] == len(limited)


def test_allow_listed_peers_are_never_limited(start_transport: Callable[..., RunningTransport], tmp_path: Path) -> None:
    config = write_config(tmp_path, requests_per_ip=1, new_connections_per_ip=1, max_connections_per_ip=1)
    running = start_transport("--config", str(config), workers=1)  # default allow-list: loopback
    clients = [SipClient.connect(running) for _ in range(3)]
    for index, client in enumerate(clients):
        client.send(b"".join(sip_request("OPTIONS", call_id=f"trusted-{index}-{i}") for i in range(10)))
        assert {client.read_response().status for _ in range(10)} == {200}
        client.close()
    assert not any(name.startswith(("refused.connection", "limited.")) for name in running.counters())


def test_ipv4_peers_of_a_dual_stack_listener_are_limited_as_ipv4_addresses(
    start_transport: Callable[..., RunningTransport], tmp_path: Path
) -> None:
    """An IPv6 listener (``[::]:5060``) sees IPv4 peers as ``::ffff:a.b.c.d``, which no IPv4 network contains.

    So ``source_limits_allow`` missed every IPv4 peer of a dual-stack listener: the allow-listed SBC or trunk was
    rate-limited and blocked like a stranger (here loopback, allow-listed by default, is answered 503).
    """
    config = write_config(tmp_path, requests_per_ip=1)
    running = start_transport("--config", str(config), workers=1, tcp="[::ffff:127.0.0.1]:0")  # IPv4 peers, mapped
    with SipClient(socket.create_connection(("127.0.0.1", running.port), timeout=5)) as client:
        client.send(b"".join(sip_request("OPTIONS", call_id=f"mapped-{i}") for i in range(10)))
        assert [client.read_response().status for _ in range(10)] == [200] * 10
    assert "limited.request_rate" not in running.counters()


def test_token_bucket_and_idle_sources_are_bounded() -> None:
    bucket = TokenBucket(10.0, now=0.0)
    assert bucket.take(25, now=0.0) == 20  # a burst of two seconds' worth
    assert bucket.take(5, now=0.0) == 0
    assert bucket.take(5, now=0.3) == 3  # refills at the rate
    fresh = TokenBucket(5.0, now=10.0)
    assert fresh.take(10, now=9.99) == 10  # a clock read a moment earlier elsewhere never drains it
    limits = SourceLimits(Settings(source_limits_allow="10.0.0.0/8", max_connections_per_ip=1))
    assert limits.admit("10.1.2.3") is None  # allow-listed
    first = limits.admit("192.0.2.1")
    assert not isinstance(first, str) and first is not None
    assert limits.admit("192.0.2.1") == "connections_per_ip"
    limits.release(first)
    assert limits.sources() == 0
    started = time.monotonic()
    again = limits.admit("192.0.2.1")  # its connect bucket was remembered while idle
    assert not isinstance(again, str) and again is not None and time.monotonic() - started < 1.0


def test_failed_authentications_block_an_address_for_the_window() -> None:
    limits = SourceLimits(Settings(source_limits_allow="", auth_failures_per_ip=3, auth_failure_window=0.5))
    source = limits.admit("192.0.2.7")
    assert not isinstance(source, str) and source is not None
    assert [limits.auth_failed(source) for _ in range(3)] == [False, False, True]
    assert limits.auth_failed(source)  # while blocked, every further failure closes its connection too
    assert limits.admit("192.0.2.7") == "auth_failures"
    assert not isinstance(limits.admit("192.0.2.8"), str)  # another address is not concerned
    limits.release(source)
    assert limits.admit("192.0.2.7") == "auth_failures"  # the block outlives the address's connections
    time.sleep(0.6)
    again = limits.admit("192.0.2.7")
    assert not isinstance(again, str) and again is not None
    assert not limits.auth_failed(again)  # a new window


def test_ipv6_peers_are_limited_by_their_64_bit_prefix() -> None:
    """A host with an IPv6 /64 (what a home line gets) picks a new source address for each connection at will.

    Counted per address, it had unlimited connections, connect rate, request rate and password guesses, and
    could push its blocks out of the 65,536 idle addresses remembered. Its /64 counts as one source now.
    (Over loopback a test has one IPv6 address: this one drives the limits directly.)
    """
    limits = SourceLimits(Settings(source_limits_allow="", max_connections_per_ip=1, auth_failures_per_ip=1))
    first = limits.admit("2001:db8:0:1::1")
    assert not isinstance(first, str) and first is not None
    assert limits.admit("2001:db8:0:1:8000::2") == "connections_per_ip"  # the same /64, another address
    other = limits.admit("2001:db8:0:2::1")  # the next /64 is another source
    assert not isinstance(other, str) and other is not None
    assert limits.auth_failed(first)
    limits.release(first)
    assert limits.admit("2001:db8:0:1::3") == "auth_failures"  # the block holds the whole /64
    per_address = SourceLimits(Settings(source_limits_allow="", max_connections_per_ip=1, source_ipv6_prefix=128))
    assert not isinstance(per_address.admit("2001:db8::1"), str)
    assert not isinstance(per_address.admit("2001:db8::2"), str)
