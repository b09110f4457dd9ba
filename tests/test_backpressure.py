"""Abusive peers are bounded: a peer that never reads stops being read, a flooder takes turns with others."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sipwire.transport.framing import Framer
from tests.conftest import RunningTransport, SipClient, sip_request, wait_for, write_config

CAP = 65536  # write_queue_bytes in these tests: small, so a non-reader reaches it fast
ONE_READ_OF_PONGS = 262144 // 4 * 2  # one 256 KiB read of 4-byte pings owes 2-byte pongs


def _pending_write_bytes(running: RunningTransport) -> int:
    return int(running.control("stats")["pending_write_bytes"])


def test_a_peer_that_pings_and_never_reads_is_bounded_by_its_write_queue(
    start_transport: Callable[..., RunningTransport], tmp_path: Path
) -> None:
    """Pongs are the transport's own writes: they count against write_queue_bytes like any answer."""
    config = write_config(tmp_path, write_queue_bytes=CAP)
    running = start_transport("--config", str(config), workers=1)
    with running.connect() as peer:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.settimeout(0.05)
        pings = b"\r\n\r\n" * 16384  # 64 KiB of keep-alives per send: 16,384 pongs owed each time
        sent = 0
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and sent < 64 << 20:
            try:
                sent += peer.send(pings)
            except TimeoutError:
                continue  # the transport stopped reading us: TCP pushes back
        # Far more pongs were owed than the cap, yet what the transport holds for us stays near the cap:
        # it stopped reading once the queue was full (one read's worth of pongs may land on top).
        held = _pending_write_bytes(running)
        assert sent > 4 * CAP
        assert held <= CAP + ONE_READ_OF_PONGS
        counters = running.counters()
        assert counters.get("paused.write_queue", 0) >= 1
    # A well-behaved client is served meanwhile and afterwards.
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", call_id="after-pings"))
        assert client.read_response().status == 200


def test_a_flooding_peer_takes_turns_with_a_well_behaved_one(start_transport: Callable[..., RunningTransport]) -> None:
    """Thousands of pipelined requests: a later client's request is not queued behind all of them."""
    running = start_transport(workers=1, threads=1)
    flood_count = 6000
    flood = b"".join(sip_request("OPTIONS", call_id=f"flood-{i}") for i in range(flood_count))
    answered = 0
    done = threading.Event()
    with running.connect() as flooder, SipClient.connect(running) as client:
        flooder.settimeout(10.0)

        def read_flood_answers() -> None:
            nonlocal answered
            framer = Framer()
            while answered < flood_count:
                try:
                    data = flooder.recv(262144)
                except OSError:
                    break
                if not data:
                    break
                answered += sum(1 for event in framer.feed(data) if isinstance(event, bytes))
            done.set()

        reader = threading.Thread(target=read_flood_answers, daemon=True)
        reader.start()
        flooder.sendall(flood[: len(flood) // 2])
        wait_for(lambda: running.counters().get("held_messages", 0) > 0, what="the flooder's messages held")
        client.send(sip_request("OPTIONS", call_id="polite"))
        assert client.read_response(timeout=10.0).status == 200
        answered_when_served = answered
        flooder.sendall(flood[len(flood) // 2 :])
        assert done.wait(30.0)
    # The polite request overtook most of the flood: it waited behind one in-flight bound, not the backlog.
    assert answered_when_served < flood_count // 2
    assert answered == flood_count  # and the flooder lost nothing: every request answered, in order
    assert running.counters()["messages_in"] == flood_count + 1
