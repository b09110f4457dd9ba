"""The control socket from the shell (``sipwire ctl``) and resizing the I/O pool under traffic."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import RunningTransport, SipClient, run_ctl, sip_request, wait_for, write_config


def _ok(running: RunningTransport, *args: str) -> str:
    result = run_ctl(running, *args)
    assert result.returncode == 0, f"ctl {args} failed ({result.returncode}): {result.stderr}"
    assert result.stderr == ""
    return result.stdout


def _refused(running: RunningTransport, *args: str) -> str:
    result = run_ctl(running, *args)
    assert result.returncode == 1, f"ctl {args} should fail: {result.stdout} {result.stderr}"
    assert result.stdout == ""
    return result.stderr


def test_ctl_threads_shows_and_resizes_the_pool(start_transport: Any, tmp_path: Path) -> None:
    running = start_transport("--config", str(write_config(tmp_path, max_threads=6)), threads=2, workers=1)
    table = _ok(running, "threads").splitlines()
    assert table[0] == "I/O threads: 2 (max 6)"
    assert table[1].split() == ["index", "connections", "load", "queue_depth", "jobs"]
    assert [row.split()[0] for row in table[2:]] == ["0", "1"]

    resized = json.loads(_ok(running, "threads", "3", "--json"))
    assert (resized["size"], resized["wanted"], resized["max"]) == (3, 3, 6)
    assert [t["index"] for t in resized["threads"]] == [0, 1, 2]
    assert json.loads(_ok(running, "threads", "--json"))["size"] == 3
    assert running.control("health")["threads"] == 3

    for bad in ("0", "-1", "7"):
        error = _refused(running, "threads", bad)
        assert error == f"sipwire ctl: thread pool size {bad} is outside 1..6\n"
    assert running.control("threads")["size"] == 3  # unchanged by the refused requests

    not_a_number = run_ctl(running, "threads", "two")
    assert not_a_number.returncode == 2
    assert "invalid int value: 'two'" in not_a_number.stderr


def test_ctl_connections_lists_and_close_closes(start_transport: Any) -> None:
    running = start_transport(workers=1)
    with SipClient.connect(running) as client, SipClient.connect(running) as other:
        requests = [sip_request("OPTIONS", cseq, call_id="listed") for cseq in (1, 2)]
        received = 0
        for request in requests:
            client.send(request)
            received += len(client.read_response().raw)
        other.send(sip_request("OPTIONS", 1, call_id="other"))
        other.read_response()

        listing = json.loads(_ok(running, "connections", "--json"))
        assert listing["total"] == 2
        mine = [c for c in listing["connections"] if c["remote"] == f"127.0.0.1:{client.local_port}"]
        assert len(mine) == 1
        info = mine[0]
        assert info["state"] == "open"
        assert info["transport"] == "tcp"
        assert info["outbound"] is False
        assert info["local"] == f"127.0.0.1:{running.port}"
        assert (info["messages_in"], info["messages_out"]) == (2, 2)
        assert info["bytes_in"] == sum(len(r) for r in requests)
        assert info["bytes_out"] == received
        assert (info["pending_write_bytes"], info["in_flight"]) == (0, 0)

        table = _ok(running, "connections").splitlines()
        assert table[0] == "2 connections"
        row = next(line for line in table[2:] if line.split()[0] == str(info["id"]))
        assert row.split()[1:3] == ["open", f"127.0.0.1:{client.local_port}"]
        assert row.split()[-1] == "2/2"

        assert _ok(running, "close", str(info["id"])) == f"connection {info['id']} closed\n"
        assert client.read_until_closed() == b""
        remaining = json.loads(_ok(running, "connections", "--json"))
        assert [c["remote"] for c in remaining["connections"]] == [f"127.0.0.1:{other.local_port}"]
        assert _refused(running, "close", str(info["id"])) == f"sipwire ctl: no open connection with id {info['id']}\n"

        other.send(sip_request("OPTIONS", 2, call_id="other"))
        assert other.read_response().all("cseq") == ["2 OPTIONS"]
    assert running.counters()["closed_by_operator"] == 1


def test_ctl_stats_and_health(start_transport: Any) -> None:
    running = start_transport(workers=2)
    with SipClient.connect(running) as client:
        client.send(sip_request("OPTIONS", 1) + b"\r\n\r\n")
        client.read_exact(2)
        client.read_response()
        stats = json.loads(_ok(running, "stats", "--json"))
    assert stats["connections"] == 1
    assert stats["max_connections"] == 2048
    assert stats["counters"]["messages_in"] == 1
    assert stats["counters"]["keepalive_pings"] == 1
    assert stats["counters"]["accepted.tcp"] == 1
    assert sorted(w["pid"] for w in stats["workers"]) == sorted(running.worker_pids)
    assert [(w["index"], w["alive"], w["restarts"], w["in_flight"]) for w in stats["workers"]] == [
        (0, True, 0, 0),
        (1, True, 0, 0),
    ]
    assert len(stats["threads"]) == 2

    text = _ok(running, "stats")
    assert "  messages_in 1\n" in text
    assert f"pid {running.worker_pids[0]} up" in text

    health = json.loads(_ok(running, "health", "--json"))
    assert health["status"] == "up"
    assert health["pid"] == running.process.pid
    assert health["listening"] == {"tcp": f"127.0.0.1:{running.port}", "tls": f"127.0.0.1:{running.tls_port}"}
    assert health["instance"] == running.control_path.parent.name
    assert (health["threads"], health["workers"]) == (2, 2)
    line = _ok(running, "health")
    assert line.startswith(f"up, pid {running.process.pid}, uptime ")
    assert line.endswith(f", tcp 127.0.0.1:{running.port}, tls 127.0.0.1:{running.tls_port}\n")


def test_ctl_stats_text_uses_the_json_names_and_says_when_a_histogram_is_empty() -> None:
    from sipwire.cli import _stats_text
    from sipwire.transport.statsblock.records import Histogram
    from sipwire.transport.statsblock.views import histogram_view

    empty = histogram_view(Histogram("", (), (0,), 0, 0.0))  # what stats_view shows before any observation
    seen = histogram_view(Histogram("dispatch_latency_ms", (0.1, 0.2, 0.5), (0, 2, 1, 1), 4, 1.0))
    text = _stats_text(
        {
            "connections": 1, "max_connections": 2048, "queue_depth": 3, "dispatch_in_flight": 2,
            "pending_write_bytes": 10, "counters": {"messages_in": 1}, "tls_handshake_ms": empty,
            "dispatch_latency_ms": seen, "write_latency_ms": empty, "ws_handshake_ms": empty,
            "read_framed_ms": empty, "queue_wait_ms": seen, "routing_ms": empty,
            "workers": [{"index": 0, "pid": 42, "alive": True, "in_flight": 2, "restarts": 0}],
        }
    )  # fmt: skip
    assert text.splitlines() == [
        "connections 1 (max_connections 2048), queue_depth 3, dispatch_in_flight 2, pending_write_bytes 10",
        "counters:",
        "  messages_in 1",
        "tls_handshake_ms: no data yet",
        "dispatch_latency_ms: 4 observed, p50 <= 0.2, p95 <= +Inf, p99 <= +Inf",
        "write_latency_ms: no data yet",
        "ws_handshake_ms: no data yet",
        "read_framed_ms: no data yet",
        "queue_wait_ms: 4 observed, p50 <= 0.2, p95 <= +Inf, p99 <= +Inf",
        "routing_ms: no data yet",
        "workers:",
        "  0: pid 42 up, in_flight 2, restarts 0",
    ]


def test_ctl_without_a_transport_says_so(start_transport: Any) -> None:
    running = start_transport(workers=1)
    running.stop()
    error = _refused(running, "health")
    assert error.startswith(f"sipwire ctl: cannot reach the transport at {running.control_path}")
    assert "--instance" in error


# -- 6. resize while connections are open ---------------------------------------------------------


def _round(clients: list[SipClient], cseq: int) -> None:
    """One OPTIONS on every connection; each answered exactly once, in order."""
    for index, client in enumerate(clients):
        client.send(sip_request("OPTIONS", cseq, call_id=f"resize-{index}"))
    for index, client in enumerate(clients):
        answer = client.read_response()
        assert answer.all("cseq") == [f"{cseq} OPTIONS"], f"connection {index}"
        assert answer.all("call-id") == [f"resize-{index}"]
        assert client.buffer == bytearray(), f"connection {index} got more than one answer"


def _threads_of(running: RunningTransport, clients: list[SipClient]) -> list[int]:
    """The owning thread of each client's connection, once every one is visible."""
    ports = [f"127.0.0.1:{client.local_port}" for client in clients]

    def lookup() -> list[int] | None:
        owners = {c["remote"]: c["thread"] for c in running.control("connections")["connections"]}
        return [owners[port] for port in ports] if all(port in owners for port in ports) else None

    return list(wait_for(lookup, what="every connection to be listed"))


def _per_thread(running: RunningTransport, total: int) -> list[int]:
    """Connections per active thread, once all ``total`` are owned by one (moves are asynchronous)."""

    def counts() -> list[int] | None:
        per_thread = [t["connections"] for t in running.control("threads")["threads"]]
        return per_thread if sum(per_thread) == total else None

    return list(wait_for(counts, what=f"{total} connections owned by active threads"))


def test_resize_keeps_every_connection_working(start_transport: Any) -> None:
    running = start_transport(threads=4, workers=2)
    clients = [SipClient.connect(running) for _ in range(8)]
    try:
        _round(clients, 1)
        assert Counter(_threads_of(running, clients)) == {0: 2, 1: 2, 2: 2, 3: 2}

        assert running.control("threads", size=1)["size"] == 1
        # Counters of the retiring threads stay in the totals while they drain: they never dip.
        assert running.counters()["messages_in"] == 8
        _round(clients, 2)
        assert _threads_of(running, clients) == [0] * 8

        assert running.control("threads", size=8)["size"] == 8
        _round(clients, 3)
        assert _threads_of(running, clients) == [0] * 8  # growing moves nothing
        # New connections go to the least-loaded threads: one to each new, empty thread.
        newcomers = [SipClient.connect(running) for _ in range(7)]
        clients += newcomers
        _round(clients, 4)
        assert sorted(_threads_of(running, newcomers)) == [1, 2, 3, 4, 5, 6, 7]
        assert _per_thread(running, 15) == [8, 1, 1, 1, 1, 1, 1, 1]

        assert running.control("threads", size=2)["size"] == 2
        assert running.counters()["messages_in"] == 8 * 3 + 15
        _round(clients, 5)
        # The six moved connections went to the least-loaded survivor, thread 1.
        assert _per_thread(running, 15) == [8, 7]
        assert Counter(_threads_of(running, clients)) == {0: 8, 1: 7}
    finally:
        for client in clients:
            client.close()
    counters = running.counters()
    assert counters["messages_in"] == 8 * 3 + 15 * 2
    assert counters.get("lost_messages", 0) == 0
    assert "I/O pool shrinking from 8 to 2 threads" in running.log_text()


def test_resize_from_one_to_many_spreads_new_connections(start_transport: Any) -> None:
    running = start_transport(threads=1, workers=1)
    old = [SipClient.connect(running) for _ in range(3)]
    new: list[SipClient] = []
    try:
        _round(old, 1)
        assert _threads_of(running, old) == [0, 0, 0]
        running.control("threads", size=4)
        new += [SipClient.connect(running) for _ in range(3)]
        _round(old + new, 2)
        assert sorted(_threads_of(running, new)) == [1, 2, 3]
        assert _per_thread(running, 6) == [3, 1, 1, 1]
    finally:
        for client in old + new:
            client.close()
