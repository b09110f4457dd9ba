"""Registered TLS clients idle with RFC 5626 keep-alives: the transport's memory per client and CPU at rest.

Starts ``sipwire transport --router proxy`` (one I/O thread and one worker
unless told otherwise) on free loopback ports, its users written to its
registrar database beforehand the way ``sipwire users add`` does (or
``--open-registrar``), then:

1. **register** — ``--clients`` TLS connections (TLS 1.3, no verification:
   the transport's development certificate), opened and registered in
   batches of ``--batch``: each sends REGISTER over its own connection as an
   RFC 5626 outbound flow (``+sip.instance``, ``reg-id=1``, ``;ob``), answers
   the 401 with SHA-256 digest credentials (qop=auth) and must get 200 with
   ``Require: outbound``. The client computes its digest answers with
   sipwire's own ``response_for`` (a load client, not a check: sipp and
   baresip check interop in the suite).
2. **memory** — the transport's VmRSS before the first connection and,
   settled, once every client is registered and idle: the growth per client.
3. **quiet** — for ``--quiet`` seconds nobody sends anything: the transport's
   CPU for holding the connections alone (its timer tick and stats block).
4. **rest** — for ``--rest`` seconds every client sends CRLFCRLF keep-alives
   at intervals drawn uniformly from ``--keepalive`` (RFC 5626 section 4.4.1's
   default for connection-oriented flows: 95 to 120 s) and reads the CRLF
   pong; the first ping of each client falls at a random point of its first
   interval, as for phones that registered at different times. The
   transport's and the worker's CPU time over the window give CPU % at rest.
   Every connection must still be open and every ping answered.

The client is one thread: blocking handshakes and REGISTER exchanges per
batch, then a selector loop for the keep-alives. Everything stays on
127.0.0.1 and is bounded in count and time.

    .venv/bin/python bench/regidle.py --clients 10000 --rest 60
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import random
import secrets
import selectors
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sipbench import raise_nofile
from wsbench import Sipwire, cpu_seconds, settled_rss, vm_rss_kib  # puts the repository on sys.path

from sipwire.config import Settings
from sipwire.transport.framing import Framer
from sipwire.transport.routers.digest import credentials_for, parse_credentials, response_for
from sipwire.transport.routers.sqlitestore import open_store
from sipwire.transport.sip import SipMessage, parse

DOMAIN = "bench.test"
PASSWORD = "bench-secret-1"
#: A keep-alive unanswered this long counts as lost (RFC 5626 section 4.4.1: 10 s for a pong).
PONG_TIMEOUT = 10.0


def add_users(state: Path, count: int) -> None:
    """bench-0..N-1@bench.test, as ``sipwire users add`` writes them (HA1 only)."""
    store = open_store(Settings(instance="wsbench", state_dir=str(state)))
    try:
        for index in range(count):
            store.add_user(credentials_for(f"bench-{index}@{DOMAIN}", PASSWORD))
    finally:
        store.close()


class Client:
    """One phone: its TLS connection, framer and keep-alive bookkeeping."""

    __slots__ = ("cseq", "framer", "index", "pending_since", "sock")

    def __init__(self, index: int, sock: ssl.SSLSocket) -> None:
        self.index = index
        self.sock = sock
        self.framer = Framer()
        self.cseq = 0
        self.pending_since = 0.0  # when the unanswered keep-alive went out (0: none)

    def register(self, authorization: str = "") -> bytes:
        self.cseq += 1
        local_port = self.sock.getsockname()[1]
        instance = f'"<urn:uuid:00000000-0000-4000-8000-{self.index:012d}>"'
        contact = f"<sip:bench-{self.index}@127.0.0.1:{local_port};transport=tls;ob>"
        lines = [
            f"REGISTER sip:{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/TLS 127.0.0.1:{local_port};branch=z9hG4bK-{self.index}-{self.cseq};rport",
            "Max-Forwards: 70",
            f"From: <sip:bench-{self.index}@{DOMAIN}>;tag=r{self.index}",
            f"To: <sip:bench-{self.index}@{DOMAIN}>",
            f"Call-ID: regidle-{self.index}",
            f"CSeq: {self.cseq} REGISTER",
            f"Contact: {contact};+sip.instance={instance};reg-id=1",
            "Supported: outbound",
            "Expires: 3600",
            *([f"Authorization: {authorization}"] if authorization else []),
            "Content-Length: 0",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def read_message(self, timeout: float) -> SipMessage:
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"client {self.index}: closed by the transport")
            for event in self.framer.feed(data):
                if isinstance(event, bytes):
                    return parse(event)


def _authorization(client: Client, challenge: SipMessage) -> str:
    value = next(v for v in challenge.header_lines("www-authenticate") if "algorithm=SHA-256" in v)
    offer = parse_credentials(value)  # a challenge has the same auth-param syntax as credentials
    assert offer is not None
    realm, nonce = offer.get("realm"), offer.get("nonce")
    user = f"bench-{client.index}"
    ha1 = credentials_for(f"{user}@{realm}", PASSWORD).ha1_sha256
    cnonce = secrets.token_hex(8)
    uri = f"sip:{DOMAIN}"
    answer = response_for("SHA-256", ha1, "REGISTER", uri, nonce, "00000001", cnonce, "auth")
    return (
        f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", response="{answer}", '
        f'algorithm=SHA-256, qop=auth, nc=00000001, cnonce="{cnonce}"'
    )


def register_batch(port: int, first: int, count: int, context: ssl.SSLContext, digest: bool) -> list[Client]:
    """Open ``count`` TLS connections and register each over its own; pipelined across the batch."""
    clients = []
    for index in range(first, first + count):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10.0)
        clients.append(Client(index, context.wrap_socket(raw)))
    for client in clients:
        client.sock.sendall(client.register())
    if digest:
        challenges = [client.read_message(10.0) for client in clients]
        for client, challenge in zip(clients, challenges, strict=True):
            if challenge.status != 401:
                raise RuntimeError(f"client {client.index}: {challenge.start_line} instead of 401")
            client.sock.sendall(client.register(_authorization(client, challenge)))
    for client in clients:
        answer = client.read_message(10.0)
        if answer.status != 200 or "outbound" not in (answer.header("require") or ""):
            raise RuntimeError(f"client {client.index}: {answer.start_line}, Require {answer.header('require')}")
    return clients


def keepalives(clients: list[Client], seconds: float, interval: tuple[float, float]) -> dict[str, int]:
    """Ping every client at its own random interval for ``seconds``; count pings, pongs, late pongs, closes."""
    selector = selectors.DefaultSelector()
    now = time.monotonic()
    due = [(now + random.uniform(0.0, interval[1]), client.index) for client in clients]
    heapq.heapify(due)
    by_index = {client.index: client for client in clients}
    for client in clients:
        client.sock.setblocking(False)
        selector.register(client.sock, selectors.EVENT_READ, client)
    counts = {"pings": 0, "pongs": 0, "late_pongs": 0, "closed": 0, "unanswered_at_end": 0}
    end = now + seconds
    while (now := time.monotonic()) < end:
        while due and due[0][0] <= now:
            _, index = heapq.heappop(due)
            client = by_index[index]
            with contextlib.suppress(ssl.SSLWantWriteError):  # 4 bytes, an empty buffer: the next one will do
                client.sock.send(b"\r\n\r\n")
            client.pending_since = now
            counts["pings"] += 1
            heapq.heappush(due, (now + random.uniform(*interval), index))
        timeout = max(0.0, min(due[0][0] if due else end, end) - now)
        for key, _ in selector.select(timeout):
            _read_pong(key.fileobj, key.data, counts, selector)  # type: ignore[arg-type]
    counts["unanswered_at_end"] = sum(1 for c in clients if c.pending_since and now - c.pending_since > PONG_TIMEOUT)
    selector.close()
    return counts


def _read_pong(sock: ssl.SSLSocket, client: Client, counts: dict[str, int], selector: selectors.BaseSelector) -> None:
    try:
        data = sock.recv(4096)
    except (ssl.SSLWantReadError, BlockingIOError):
        return  # a TLS record not complete yet (or a session ticket)
    if not data:
        counts["closed"] += 1
        selector.unregister(sock)
        return
    if b"\r\n" in data and client.pending_since:
        late = time.monotonic() - client.pending_since > PONG_TIMEOUT
        counts["late_pongs" if late else "pongs"] += 1
        client.pending_since = 0.0


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    digest = not args.open_registrar
    if digest:
        started = time.monotonic()
        add_users(work / "state", args.clients)
        print(f"{args.clients} users added in {time.monotonic() - started:.1f} s")
    config = (
        f"max_connections = {args.clients + 64}\nidle_timeout = {args.idle_timeout}\nregistrar_max_expires = 3600\n"
    )
    extra = ("--router", "proxy", *(["--open-registrar"] if not digest else []))
    server = Sipwire(work, args.threads, args.workers, config, extra)
    try:
        transport = server.process.pid
        workers = [w["pid"] for w in server.control("stats")["workers"]]
        rss_before = settled_rss(transport)
        worker_rss_before = sum(vm_rss_kib(pid) for pid in workers)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        clients: list[Client] = []
        started = time.monotonic()
        cpu_start = cpu_seconds(transport) + sum(cpu_seconds(pid) for pid in workers)
        while len(clients) < args.clients:
            clients += register_batch(
                server.tls_port, len(clients), min(args.batch, args.clients - len(clients)), context, digest
            )
        register_seconds = time.monotonic() - started
        register_cpu = cpu_seconds(transport) + sum(cpu_seconds(pid) for pid in workers) - cpu_start
        print(f"{len(clients)} registered in {register_seconds:.1f} s")
        store = open_store(Settings(instance="wsbench", state_dir=str(work / "state")))
        try:
            bindings = len(store.registrations(time.time()))
        finally:
            store.close()
        rss_idle = settled_rss(transport)
        worker_rss_idle = sum(vm_rss_kib(pid) for pid in workers)
        quiet_cpu = cpu_seconds(transport)
        time.sleep(args.quiet)
        quiet_cpu = cpu_seconds(transport) - quiet_cpu
        transport_cpu, worker_cpu = cpu_seconds(transport), sum(cpu_seconds(pid) for pid in workers)
        client_cpu = time.process_time()
        window = time.monotonic()
        counts = keepalives(clients, args.rest, (args.keepalive[0], args.keepalive[1]))
        window = time.monotonic() - window
        transport_cpu = cpu_seconds(transport) - transport_cpu
        worker_cpu = sum(cpu_seconds(pid) for pid in workers) - worker_cpu
        client_cpu = time.process_time() - client_cpu
        stats = server.control("stats")
        for client in clients:
            client.sock.close()
    finally:
        server.stop()
    n = args.clients
    return {
        "clients": n,
        "digest": digest,
        "register_seconds": round(register_seconds, 1),
        "register_cpu_ms_per_client": round(register_cpu * 1000.0 / n, 3),
        "bindings": bindings,
        "transport_rss_kib": {"before": rss_before, "registered_idle": rss_idle},
        "transport_kib_per_client": round((rss_idle - rss_before) / n, 2),
        "worker_rss_kib": {"before": worker_rss_before, "registered_idle": worker_rss_idle},
        "rest_window_s": round(window, 1),
        "keepalive_interval_s": args.keepalive,
        "keepalives": counts,
        "transport_cpu_pct_quiet": round(quiet_cpu * 100.0 / args.quiet, 2) if args.quiet else None,
        "transport_cpu_pct_at_rest": round(transport_cpu * 100.0 / window, 2),
        "worker_cpu_pct_at_rest": round(worker_cpu * 100.0 / window, 2),
        "client_cpu_pct": round(client_cpu * 100.0 / window, 2),
        "transport_connections_at_end": stats["connections"],
        "transport_keepalive_pings": stats["counters"].get("keepalive_pings", 0),
        "transport_closed": stats["counters"].get("closed", 0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=200, help="connections opened and registered at once")
    parser.add_argument("--rest", type=float, default=60.0, help="seconds of keep-alives measured")
    parser.add_argument("--quiet", type=float, default=30.0, help="seconds measured with no keep-alives first")
    parser.add_argument("--keepalive", type=float, nargs=2, default=(95.0, 120.0), metavar=("MIN", "MAX"))
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="the transport's idle_timeout")
    parser.add_argument("--open-registrar", action="store_true", help="no users, no digest (labs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not (1 <= args.clients <= 20000 and 1 <= args.batch <= 1000 and 0 < args.rest <= 600 and 0 <= args.quiet <= 600):
        parser.error("clients 1..20000, batch 1..1000, rest 0..600 s, quiet 0..600 s")
    if not 0 < args.keepalive[0] <= args.keepalive[1] < args.idle_timeout:
        parser.error("keep-alive interval: 0 < MIN <= MAX < --idle-timeout")
    soft = raise_nofile(args.clients * 2 + 1000)  # our sockets and the transport's (it inherits the limit)
    if soft < args.clients + 500:
        parser.error(f"open-files limit {soft} is too low for {args.clients} clients (raise ulimit -Hn)")
    with tempfile.TemporaryDirectory(prefix="regidle-") as work:
        result = run(args, Path(work))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["transport_connections_at_end"] == result["bindings"] == args.clients
    ok = ok and not result["keepalives"]["closed"]
    return 0 if ok and not result["keepalives"]["unanswered_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
