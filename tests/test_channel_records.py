"""Which records a worker gets on its channel: real I/O threads, the worker's end driven here.

The worker side of the channel is this test: it writes WRITE records and reads what the I/O
thread sends back, so the contract is checked at the wire, where a worker sees it. Outcomes as
the WRITE flags ask: ``FLAG_PROMPT_OUTCOME`` (a ``sent`` at once), no flag (a ``sent`` later,
with a tick or later records) and ``FLAG_NO_OUTCOME`` (nothing at all, though the transport
still counts it). Closed connections: announced only when the router has a hook for them.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sipwire.config import Settings
from sipwire.transport.connection import Connection
from sipwire.transport.framing import FramerLimits
from sipwire.transport.hub import Hub
from sipwire.transport.iostate import TICK_SECONDS
from sipwire.transport.iothread import IOThread
from sipwire.transport.outcome import WriteResult
from sipwire.transport.streams import TcpStream
from sipwire.transport.wire import (
    FLAG_NO_OUTCOME,
    FLAG_PROMPT_OUTCOME,
    ConnectionsClosedRecord,
    MessageRecord,
    OutcomeRecord,
    Record,
    RecordReader,
    encode_write,
)
from tests.conftest import wait_for


class WorkerEnd:
    """The worker's end of one channel: write WRITE records, read what comes back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = RecordReader()

    def write(self, job_id: int, conn_id: int, flags: int) -> None:
        self.sock.sendall(encode_write(job_id, conn_id, "tcp", "", 0, f"JOB {job_id}\r\n".encode(), flags=flags))

    def outcomes(self, seconds: float) -> list[OutcomeRecord]:
        """Every OUTCOME record that arrives within ``seconds`` (or until the channel closes)."""
        return [record for record in self.records(seconds) if isinstance(record, OutcomeRecord)]

    def records(self, seconds: float) -> list[Record]:
        """Every record that arrives within ``seconds`` (or until the channel closes)."""
        records: list[Record] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and select.select([self.sock], [], [], left)[0]:
            data = self.sock.recv(65536)
            if not data:
                break
            records += self.reader.feed(data)
        return records


Wired = tuple[IOThread, IOThread, WorkerEnd, Connection, socket.socket]


@pytest.fixture(params=[True], ids=["announcing"])
def wired(request: pytest.FixtureRequest) -> Iterator[Wired]:
    """Two I/O threads, one worker channel to thread 1, and a client connection that thread 1 owns."""
    hub: Hub[IOThread] = Hub(Settings(), worker_count=1)
    hub.announce_closes = request.param
    first, second = IOThread(0, hub), IOThread(1, hub)
    hub.threads = (first, second)
    for thread in (first, second):
        thread.start()
    transport_end, worker_end = socket.socketpair()
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    conn = Connection(hub.new_connection_id(), ours, TcpStream(ours), "tcp", ("127.0.0.1", 5060),
                      ("127.0.0.1", 40000), FramerLimits(), time.monotonic())  # fmt: skip
    second.post("add_channel", 0, transport_end)
    second.post("adopt", conn, False)
    wait_for(lambda: conn.id in second.conns and second.channels[0] is not None, what="connection and channel")
    peer.settimeout(5.0)
    yield first, second, WorkerEnd(worker_end), conn, peer
    for thread in (first, second):
        thread.post("shutdown", 0.0)
    for thread in (first, second):
        thread.thread.join(5.0)
    peer.close()
    worker_end.close()


def test_a_job_without_a_callback_gets_no_outcome_record_but_is_counted(wired: Wired) -> None:
    _, thread, worker, conn, peer = wired
    worker.write(1, conn.id, FLAG_NO_OUTCOME)
    worker.write(2, conn.id, FLAG_PROMPT_OUTCOME)
    received = b""
    while len(received) < len(b"JOB 1\r\nJOB 2\r\n"):
        received += peer.recv(100)
    assert received == b"JOB 1\r\nJOB 2\r\n"
    [outcome] = worker.outcomes(3 * TICK_SECONDS)  # past the ticks that carry late outcomes
    assert (outcome.job_id, outcome.result) == (2, WriteResult.SENT)
    assert thread.counters["write.sent"] == 2


def test_a_late_sent_comes_with_a_tick(wired: Wired) -> None:
    _, _, worker, conn, peer = wired
    worker.write(7, conn.id, 0)
    [outcome] = worker.outcomes(3 * TICK_SECONDS)
    assert (outcome.job_id, outcome.conn_id, outcome.result) == (7, conn.id, WriteResult.SENT)
    assert peer.recv(100) == b"JOB 7\r\n"


def test_a_late_sent_still_reaches_the_worker_when_its_thread_retires(wired: Wired) -> None:
    """A shrink retires the thread right after the job was sent: its last tick must not drop what it owes."""
    first, second, worker, conn, peer = wired
    worker.write(9, conn.id, 0)
    assert peer.recv(100) == b"JOB 9\r\n"
    second.post("retire", (first,), 5.0)
    outcomes = worker.outcomes(3 * TICK_SECONDS)
    assert [(o.job_id, o.result) for o in outcomes] == [(9, WriteResult.SENT)]


@pytest.mark.parametrize("wired", [True, False], ids=["router_with_hook", "router_without_hook"], indirect=True)
def test_a_closed_connection_is_announced_only_to_routers_that_asked(wired: Wired) -> None:
    _, thread, worker, conn, peer = wired
    peer.sendall(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 0\r\n\r\n")
    [message] = [r for r in worker.records(3 * TICK_SECONDS) if isinstance(r, MessageRecord)]
    assert message.conn_id == conn.id
    peer.close()  # the connection carried a message, then closed
    closed = [r for r in worker.records(3 * TICK_SECONDS) if isinstance(r, ConnectionsClosedRecord)]
    assert closed == ([ConnectionsClosedRecord((conn.id,))] if thread.hub.announce_closes else [])


def test_the_worker_asks_for_outcomes_as_the_router_did() -> None:
    """A real Worker loop: a router replies without a callback, with one, and with a failures-only one."""
    from sipwire.transport.resolver import Resolver, ResolverLimits
    from sipwire.transport.routing import RouteContext
    from sipwire.transport.sip import SipMessage
    from sipwire.transport.wire import WriteRecord, encode_message, message_prefix
    from sipwire.transport.worker import CONTROL, CONTROL_ADD_CHANNEL, CONTROL_STOP, Worker

    def route(message: SipMessage, ctx: RouteContext) -> None:
        ctx.reply(b"no callback")
        ctx.reply(b"callback", lambda outcome: None)
        ctx.reply(b"failures only", lambda outcome: None, failures_only=True)

    control_worker, control_test = socket.socketpair()
    channel_worker, channel_test = socket.socketpair()
    resolver = Resolver(ResolverLimits.from_settings(Settings()))
    worker = Worker(0, control_worker, route, resolver)
    loop = threading.Thread(target=worker.run, daemon=True)
    loop.start()
    try:
        socket.send_fds(control_test, [CONTROL.pack(CONTROL_ADD_CHANNEL, 0)], [channel_worker.fileno()])
        prefix = message_prefix(5, "tcp", ("127.0.0.1", 5060), ("127.0.0.1", 40000))
        request = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:40000;branch=z9hG4bK1\r\n"
        request += (
            b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n\r\n"
        )
        channel_test.sendall(encode_message(prefix, time.time(), b"", request))
        reader = RecordReader()
        writes: list[WriteRecord] = []
        channel_test.settimeout(5.0)
        while len(writes) < 3:
            writes += [r for r in reader.feed(channel_test.recv(65536)) if isinstance(r, WriteRecord)]
        assert [(w.payload, w.flags) for w in writes] == [
            (b"no callback", FLAG_NO_OUTCOME), (b"callback", FLAG_PROMPT_OUTCOME), (b"failures only", 0),
        ]  # fmt: skip
    finally:
        control_test.send(CONTROL.pack(CONTROL_STOP, 0))
        loop.join(5.0)
        resolver.close()
        channel_worker.close()
        for sock in (control_test, control_worker, channel_test):
            sock.close()
