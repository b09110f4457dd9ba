"""The latency floor of a hop to a worker process on this machine, without any SIP code.

sipwire's exchange crosses processes three times (peer → I/O thread, I/O thread → worker,
worker → I/O thread) where a single-process server such as Kamailio's TCP worker has one
wake-up. This script measures what that design costs by itself: an echo server in Python
that answers on the spot (``direct``), and the same server handing every message to a
worker process over a socketpair and sending the worker's answer back (``hop``), both
driven by one client at a fixed rate over one TCP connection, alternated in rounds.
Optionally the server and its worker are pinned to one CPU (``--pin CPU``), the client to
another. It prints round-trip p50/p99 and the server side's CPU per exchange.

    python3 bench/hopfloor.py --rate 500 --messages 5000 --rounds 3 --pin 1

Bounded: every run sends ``--messages`` at ``--rate`` and gives up after twice its
nominal duration plus 10 s. Loopback only. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import sys
import time
from dataclasses import dataclass

MESSAGE = b"x" * 400  # about the size of sipp's OPTIONS
RECV = 65536


def serve(listener: socket.socket, hop: bool) -> None:
    """Accept one client; echo each message, directly or through a worker process."""
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not hop:
        while data := conn.recv(RECV):
            conn.sendall(data)
        return
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the worker: echo what the server hands over
        conn.close()
        ours.close()
        while data := theirs.recv(RECV):
            theirs.sendall(data)
        os._exit(0)
    theirs.close()
    selector = selectors.DefaultSelector()
    selector.register(conn, selectors.EVENT_READ, ours)
    selector.register(ours, selectors.EVENT_READ, conn)
    while True:
        for key, _ in selector.select():
            data = key.fileobj.recv(RECV)  # type: ignore[union-attr]
            if not data:
                ours.close()
                os.waitpid(pid, 0)
                return
            key.data.sendall(data)


@dataclass
class Result:
    p50_ms: float
    p99_ms: float
    cpu_us: float
    answered: int


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its reaped and live children (from /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    children = f"/proc/{pid}/task/{pid}/children"
    if os.path.exists(children):
        with open(children) as handle:
            pids += [int(p) for p in handle.read().split()]
    for each in pids:
        with open(f"/proc/{each}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick
    return total


def run(hop: bool, rate: int, messages: int, pin: int | None) -> Result:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        if pin is not None:
            os.sched_setaffinity(0, {pin})
        serve(listener, hop)
        os._exit(0)
    listener_address = listener.getsockname()
    listener.close()
    client = socket.create_connection(listener_address)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.settimeout(1.0)
    time.sleep(0.2)  # the worker is forked
    cpu_before = cpu_seconds(pid)
    times: list[float] = []
    interval = 1.0 / rate
    deadline = time.monotonic() + 2 * messages / rate + 10
    next_send = time.monotonic()
    for _ in range(messages):
        now = time.monotonic()
        if now > deadline:
            break
        if next_send > now:
            time.sleep(next_send - now)
        next_send += interval
        started = time.perf_counter()
        client.sendall(MESSAGE)
        received = 0
        try:
            while received < len(MESSAGE):
                received += len(client.recv(RECV))
        except TimeoutError:
            break
        times.append((time.perf_counter() - started) * 1000.0)
    cpu = cpu_seconds(pid) - cpu_before
    client.close()
    os.waitpid(pid, 0)
    cuts = statistics.quantiles(times, n=100) if len(times) > 1 else [0.0] * 99
    return Result(cuts[49], cuts[98], cpu / max(len(times), 1) * 1e6, len(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=500, help="messages per second (default 500)")
    parser.add_argument("--messages", type=int, default=5000, help="messages per run (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--pin", type=int, help="pin the server and its worker to this CPU, the client to another")
    args = parser.parse_args()
    if args.pin is not None:
        others = sorted(os.sched_getaffinity(0) - {args.pin})
        if others:
            os.sched_setaffinity(0, {others[0]})
    print(f"{'round':>5} {'server':>7} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/exch':>12} {'answered':>9}")
    results: dict[str, list[Result]] = {"direct": [], "hop": []}
    for round_number in range(1, args.rounds + 1):
        for name, rows in results.items():
            result = run(name == "hop", args.rate, args.messages, args.pin)
            rows.append(result)
            print(
                f"{round_number:>5} {name:>7} {result.p50_ms:8.3f} {result.p99_ms:8.3f} "
                f"{result.cpu_us:12.1f} {result.answered:>9}"
            )
            sys.stdout.flush()
    print("medians over rounds:")
    for name, rows in results.items():
        print(
            f"{'':>5} {name:>7} {statistics.median(r.p50_ms for r in rows):8.3f} "
            f"{statistics.median(r.p99_ms for r in rows):8.3f} {statistics.median(r.cpu_us for r in rows):12.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
