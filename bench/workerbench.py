"""A worker's CPU per message, measured on a real worker process with nothing else in the way.

The worker is started as the transport starts it (``python -m sipwire.transport.worker`` with
a control socket and one channel passed over it); this script plays the I/O thread: it writes
MESSAGE records of sipp's OPTIONS in batches and reads the WRITE and DONE records back. The
worker's user + system CPU per message, from /proc, is the ceiling of what one worker can
route per second (the capacity target of tcp/t1 is bound by it), free of the transport's
share and of wake-ups between processes.

    python3 bench/workerbench.py                           # responder, batches of 32
    python3 bench/workerbench.py --batch 1 --messages 20000
    python3 bench/workerbench.py --router proxy             # requests forwarded upstream
    python3 bench/workerbench.py --repo /tmp/other-clone   # time another checkout

Bounded: ``--messages`` per round, ``--rounds`` rounds, a 60 s deadline per round.
Prints the median over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPTIONS = (
    b"OPTIONS sip:bench@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:44575;branch=z9hG4bK-29332-%d-0;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:sipbench@127.0.0.1:44575>;tag=sb29332-%d\r\n"
    b"To: <sip:bench@127.0.0.1:5060>\r\n"
    b"Call-ID: %d-29332@127.0.0.1\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Contact: <sip:sipbench@127.0.0.1:44575;transport=tcp>\r\n"
    b"Accept: application/sdp\r\n"
    b"User-Agent: sipbench\r\n"
    b"Content-Length: 0\r\n\r\n"
)
DEADLINE_SECONDS = 60.0


def worker_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(repo: Path, router: str, messages: int, batch: int) -> float:
    """Worker CPU microseconds per message over ``messages`` messages sent ``batch`` at a time."""
    sys.path.insert(0, str(repo))  # this checkout's sipwire, here and (by the cwd) in the worker
    with tempfile.TemporaryDirectory(prefix="workerbench-") as state_dir:
        return _timed_worker(repo, router, messages, batch, state_dir)


def _timed_worker(repo: Path, router: str, messages: int, batch: int, state_dir: str) -> float:
    """One worker process with its own state directory, timed over ``messages`` after a warm-up."""
    from sipwire.config import Settings
    from sipwire.transport.wire import DoneRecord, RecordReader, encode_message, message_prefix
    from sipwire.transport.worker import CONTROL, CONTROL_ADD_CHANNEL, CONTROL_STOP

    if router == "proxy":  # forwards every OPTIONS (it is not for the proxy's own domain) to a stand-in upstream
        settings = Settings(router=router, state_dir=state_dir, upstream="sip:127.0.0.1:5070", open_registrar=True)
    else:
        settings = Settings(router=router, state_dir=state_dir)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    command = [
        sys.executable, "-m", "sipwire.transport.worker", "--index", "0",
        "--control-fd", str(theirs.fileno()), "--settings", json.dumps(dataclasses.asdict(settings)),
    ]  # fmt: skip
    worker = subprocess.Popen(command, pass_fds=(theirs.fileno(),), cwd=repo, stdin=subprocess.DEVNULL)
    theirs.close()
    channel, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    socket.send_fds(ours, [CONTROL.pack(CONTROL_ADD_CHANNEL, 0)], [worker_end.fileno()])
    worker_end.close()
    prefix = message_prefix(1, "tcp", ("127.0.0.1", 5060), ("127.0.0.1", 44575))
    reader = RecordReader()
    deadline = time.monotonic() + DEADLINE_SECONDS

    def exchange(first: int, count: int) -> None:
        now = time.time()
        batch = (encode_message(prefix, now, b"", OPTIONS % (n, n, n)) for n in range(first, first + count))
        channel.sendall(b"".join(batch))
        done = 0
        while done < count:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not answer in time")
            data = channel.recv(1 << 20)
            if not data:
                raise ConnectionError("the worker closed its channel")
            done += sum(record.messages for record in reader.feed(data) if isinstance(record, DoneRecord))

    exchange(0, 1000)  # warm up: imports, caches
    before = worker_cpu(worker.pid)
    for first in range(1000, 1000 + messages, batch):
        exchange(first, min(batch, 1000 + messages - first))
    cpu = worker_cpu(worker.pid) - before
    ours.send(CONTROL.pack(CONTROL_STOP, 0))
    ours.close()
    worker.wait(timeout=10)
    return cpu / messages * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout to time")
    parser.add_argument("--router", default="responder", help="router to load (default responder)")
    parser.add_argument("--messages", type=int, default=50000, help="messages per round (default 50000)")
    parser.add_argument("--batch", type=int, default=32, help="messages per channel write (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    rounds = [one_round(args.repo.resolve(), args.router, args.messages, args.batch) for _ in range(args.rounds)]
    print(
        f"worker CPU per message: {statistics.median(rounds):.1f} us (median of {args.rounds}; "
        f"{', '.join(f'{r:.1f}' for r in rounds)}), router {args.router}, batch {args.batch}, {args.repo}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
