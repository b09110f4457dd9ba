"""A connection handed to an I/O thread that a shrink retires meanwhile lives on in an active thread.

Thread 0 picks a target for each accepted connection from the pool as it is at
that instant; the supervisor may retire that thread before its inbox gets the
``adopt`` job. Real I/O threads and sockets, driven through their inboxes as the
transport drives them; the race is made certain by posting ``retire`` first.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from sipwire.config import Settings
from sipwire.transport.connection import Connection, ConnState
from sipwire.transport.framing import FramerLimits
from sipwire.transport.hub import Hub
from sipwire.transport.iothread import IOThread
from sipwire.transport.streams import TcpStream
from tests.conftest import wait_for


@pytest.fixture
def pool() -> Iterator[tuple[Hub[IOThread], IOThread, IOThread]]:
    hub: Hub[IOThread] = Hub(Settings(), worker_count=0)
    active, retiring = IOThread(0, hub), IOThread(1, hub)
    hub.threads = (active, retiring)
    active.start()
    retiring.start()
    yield hub, active, retiring
    for thread in (active, retiring):
        thread.post("shutdown", 0.0)
    for thread in (active, retiring):
        thread.thread.join(5.0)


def _accepted_connection(hub: Hub[IOThread]) -> tuple[Connection, socket.socket]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    conn = Connection(hub.new_connection_id(), ours, TcpStream(ours), "tcp", ("127.0.0.1", 5060),
                      ("127.0.0.1", 40000), FramerLimits(), time.monotonic())  # fmt: skip
    return conn, peer


def test_an_adopt_that_reaches_a_retired_thread_goes_to_an_active_one(
    pool: tuple[Hub[IOThread], IOThread, IOThread],
) -> None:
    hub, active, retiring = pool
    hub.threads = (active,)  # the supervisor's shrink: the pool first, then the retire job
    retiring.post("retire", (active,), 5.0)
    conn, peer = _accepted_connection(hub)
    retiring.post("adopt", conn, True)  # thread 0 chose the retiring thread just before the shrink
    wait_for(lambda: conn.id in active.conns, what="the connection to reach the active thread")
    assert hub.owner(conn.id) is active
    time.sleep(0.6)  # past the retiring thread's next ticks, when it used to close what it still held
    assert conn.state is ConnState.OPEN and conn.id in active.conns
    peer.close()


def test_a_retiring_thread_opens_no_connection(pool: tuple[Hub[IOThread], IOThread, IOThread]) -> None:
    hub, active, retiring = pool
    hub.threads = (active,)
    retiring.post("retire", (active,), 5.0)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        retiring.post("_connect", ("tcp", "127.0.0.1", port), "", 1, -1, b"OPTIONS", False)
        listener.settimeout(5.0)
        accepted, _ = listener.accept()
        with accepted:
            wait_for(lambda: len(active.conns) == 1, what="the outbound connection on the active thread")
            assert not retiring.conns
            accepted.settimeout(5.0)
            assert accepted.recv(100) == b"OPTIONS"
