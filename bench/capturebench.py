#!/usr/bin/env python3
"""capturebench: what the call-flow capture costs, in-process (no sockets), on both of its sides.

* **hooks**: the two appends an OPTIONS exchange makes on the data path (its MESSAGE record
  received, its 200 sent) into a full ring of the default size, minus building the record
  alone, which the I/O thread does anyway: the capture's own cost per exchange.
* **evictions**: how long one eviction holds the ring's lock (the I/O threads wait on it), in a
  full ring of ``--stall-bytes`` of distinct messages, with the cyclic GC off so that its pauses
  are not counted as the ring's.
* **reads**: the ``calls`` control op on a full ring the first time (every entry summarized),
  then after ``--new`` more messages (what a console polling every 2 s at 4,000 exchanges/s
  makes the control thread summarize), and the ``call`` op for one call.

Usage: ``python3 bench/capturebench.py [--exchanges N] [--new N] [--capture-bytes N] [--stall-bytes N]``.
End-to-end figures (sipbench, on vs off alternated) are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipwire.transport.capture import CaptureRing, Outbound
from sipwire.transport.capturequery import CaptureQuery
from sipwire.transport.wire import encode_message, message_prefix

PREFIX = message_prefix(1, "tcp", ("127.0.0.1", 5060), ("127.0.0.1", 40000))


def options(call_id: str) -> tuple[bytes, bytes]:
    """An OPTIONS request like sipp's and its 200 (about 330 and 300 bytes)."""
    common = (
        f"Via: SIP/2.0/TCP 127.0.0.1:40000;branch=z9hG4bK-{call_id}\r\nFrom: <sip:sipp@127.0.0.1:40000>;tag=1\r\n"
        f"To: <sip:service@127.0.0.1:5060>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
    )
    request = f"OPTIONS sip:service@127.0.0.1:5060 SIP/2.0\r\n{common}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    response = f"SIP/2.0 200 OK\r\n{common}Content-Length: 0\r\n\r\n"
    return request.encode(), response.encode()


def hooks(capture_bytes: int, exchanges: int) -> float:
    """Microseconds the capture adds per exchange (median of 5 rounds)."""
    request, response = options("bench-call@127.0.0.1")
    ring = CaptureRing(capture_bytes)
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(exchanges):
            record = encode_message(PREFIX, 1.0, b"", request)
            ring.received([record])
            ring.sent(PREFIX, response, None)
        with_capture = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(exchanges):
            record = encode_message(PREFIX, 1.0, b"", request)
            [record]  # noqa: B018 - the same list the hook takes, built and dropped
        alone = time.perf_counter() - started
        rounds.append((with_capture - alone) / exchanges * 1e6)
    return statistics.median(rounds)


def evictions(capture_bytes: int, appends: int = 200_000) -> tuple[float, float, int]:
    """(median, max) milliseconds one eviction holds the lock, and how many there were."""
    ring = CaptureRing(capture_bytes)
    text = b"OPTIONS sip:service@127.0.0.1:5060 SIP/2.0\r\nX-Pad: " + b"p" * 260 + b"\r\n\r\n"
    index = 0
    while not ring.statistics()["evicted"]:
        ring.received([encode_message(PREFIX, 1.0, b"", text + b"%d" % index)])
        index += 1
    held: list[float] = []
    evict = ring._evict

    def timed() -> list[bytes | Outbound]:
        started = time.perf_counter()
        gone = evict()
        held.append((time.perf_counter() - started) * 1000)
        return gone

    ring._evict = timed  # type: ignore[method-assign]
    gc.disable()
    try:
        for offset in range(appends):
            ring.received([encode_message(PREFIX, 1.0, b"", text + b"%d" % (index + offset))])
    finally:
        gc.enable()
    return statistics.median(held), max(held), len(held)


def reads(capture_bytes: int, new: int) -> dict[str, float]:
    """Milliseconds of the control ops, and how many messages the full ring held."""
    ring = CaptureRing(capture_bytes)
    index = 0

    def carry(count: int) -> None:
        nonlocal index
        for _ in range(count // 2):
            request, response = options(f"call-{index}@127.0.0.1")
            ring.received([encode_message(PREFIX, time.time(), b"", request)])
            ring.sent(PREFIX, response, None)
            index += 1

    carry(2 * capture_bytes // 400)  # more than fits: the ring is full and evicting
    query = CaptureQuery(ring, bodies=False)
    started = time.perf_counter()
    query.calls({"limit": 50})
    first = (time.perf_counter() - started) * 1000
    carry(new)
    started = time.perf_counter()
    query.calls({"limit": 50, "method": "OPTIONS"})
    incremental = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    query.call({"call_id": f"call-{index - 1}@127.0.0.1"})
    one_call = (time.perf_counter() - started) * 1000
    return {"held": ring.statistics()["messages"], "first_ms": first, "incremental_ms": incremental,
            "call_ms": one_call}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exchanges", type=int, default=100_000, help="exchanges per hook round")
    parser.add_argument("--new", type=int, default=8000, help="messages between two list queries")
    parser.add_argument("--capture-bytes", type=int, default=8 << 20, help="ring size (default: the setting's)")
    parser.add_argument("--stall-bytes", type=int, default=256 << 20, help="ring size for the evictions figure")
    args = parser.parse_args()
    print(f"hooks: {hooks(args.capture_bytes, args.exchanges):.2f} us per exchange (received + sent, ring full)")
    median, longest, count = evictions(args.stall_bytes)
    print(f"evictions: the lock held {median:.3f} ms (median), {longest:.2f} ms (max) over {count} evictions")
    figures = reads(args.capture_bytes, args.new)
    print(
        f"reads: ring of {figures['held']} messages; first calls op {figures['first_ms']:.0f} ms, after "
        f"{args.new} new messages {figures['incremental_ms']:.0f} ms, one call {figures['call_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
