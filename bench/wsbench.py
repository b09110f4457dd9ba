"""WSS against plain TLS on the same sipwire, in one run: latency at a fixed rate, and idle WSS connections.

Starts ``sipwire transport`` (TLS and WSS listeners, the responder router; 1 I/O
thread and 1 worker unless told otherwise) on free loopback ports, then:

1. **latency** — OPTIONS → 200 over ONE connection at ``--rate`` messages/s for
   ``--messages`` messages, over TLS and then over WSS, ``--rounds`` times
   alternating (so drift on the machine hits both), or with ``--together``
   both connections at once in each round (on a machine shared with other
   work, the only way to make its noise hit both alike). The client is an asyncio
   program written here: a paced sender and a reader. TLS uses asyncio's TLS
   streams; WSS uses, by ``--client``, either the same TLS streams with
   wsproto's client-side codec on top (``wsproto``, the default: the two
   clients then differ only by the WebSocket layer, so the difference is the
   server's) or the ``websockets`` library's own asyncio client
   (``websockets``: its extra tasks and queues add client-side latency).
   Round-trip times come from ``perf_counter`` around each request;
   p50/p90/p99/max per transport over all rounds.
2. **idle** — ``--idle`` WSS connections opened (TLS 1.3, upgrade with the
   ``sip`` subprotocol, with ``websockets``) and held ``--hold`` seconds while the transport pings
   every one of them (``ws_ping_interval`` = ``--ping-interval``; the client
   library answers). The transport's VmRSS before and after (settled) gives
   the memory per connection; every connection must still be open at the end
   and the transport must have sent at least one ping per connection.

3. **codec** — in-process, no sockets: microseconds per message of the
   WebSocket layer (feed of one client frame, frame of one answer) against
   the SIP framer's feed of the same request (``--codec`` messages).

Targets checked (``--p99-ratio``, ``--idle-target-kib``): WSS p99 within 1.2x
of TLS p99, at most 32 KiB per idle WSS connection, all idle connections
held. Everything stays on 127.0.0.1 and is bounded in count and time.

    .venv/bin/python bench/wsbench.py --rate 500 --messages 10000 --rounds 3 --idle 5000 --hold 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State
from websockets.typing import Subprotocol
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sipwire.transport.control import ControlClient  # noqa: E402 - after the path set-up above
from sipwire.transport.framing import Framer  # noqa: E402
from sipwire.transport.wsframing import WsControl, WsFramer, WsLimits  # noqa: E402

OPTIONS = (
    "OPTIONS sip:bench@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/{via} {host};branch=z9hG4bK-{cseq};rport\r\n"
    "Max-Forwards: 70\r\nFrom: <sip:wsbench@127.0.0.1>;tag=wsb\r\nTo: <sip:bench@127.0.0.1>\r\n"
    "Call-ID: wsbench-{via}\r\nCSeq: {cseq} OPTIONS\r\nContent-Length: 0\r\n\r\n"
)


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the transport's generated development certificate
    return context


def _cseq(message: bytes) -> int:
    start = message.index(b"\r\nCSeq:") + 7
    return int(message[start : message.index(b" OPTIONS", start)])


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000.0, 3)

    if not ordered:
        return {"count": 0}
    mean_ms = round(statistics.fmean(ordered) * 1000.0, 3)
    return {"count": len(ordered), "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "max_ms": at(1.0),
            "mean_ms": mean_ms}  # fmt: skip


async def _paced(send: Any, rate: float, count: int, via: str, sent: dict[int, float]) -> None:
    interval = 1.0 / rate
    start = time.perf_counter()
    for cseq in range(1, count + 1):
        delay = start + (cseq - 1) * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[cseq] = time.perf_counter()
        await send(OPTIONS.format(via=via, host="wsbench.invalid" if via == "WSS" else "127.0.0.1:5999", cseq=cseq))


async def run_tls(port: int, rate: float, count: int) -> tuple[list[float], int]:
    """OPTIONS over one TLS connection at ``rate``; the round-trip times and how many got no answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_context())
    sent: dict[int, float] = {}
    rtts: list[float] = []

    async def send(text: str) -> None:
        writer.write(text.encode())

    async def receive() -> None:
        framer = Framer()
        while len(rtts) < count:
            data = await reader.read(65536)
            if not data:
                return
            now = time.perf_counter()
            for event in framer.feed(data):
                if isinstance(event, bytes):
                    rtts.append(now - sent.pop(_cseq(event)))

    receiver = asyncio.create_task(receive())
    await _paced(send, rate, count, "TLS", sent)
    with contextlib.suppress(TimeoutError):  # what is still missing then counts as lost
        await asyncio.wait_for(receiver, 10.0)
    writer.close()
    return rtts, count - len(rtts)


async def run_wss(port: int, rate: float, count: int) -> tuple[list[float], int]:
    """OPTIONS over one WSS connection at ``rate``; the round-trip times and how many got no answer."""
    sent: dict[int, float] = {}
    rtts: list[float] = []
    async with connect(
        f"wss://127.0.0.1:{port}/", ssl=_client_context(), subprotocols=[Subprotocol("sip")], compression=None,
        ping_interval=None, max_queue=None, proxy=None,
    ) as ws:  # fmt: skip

        async def receive() -> None:
            while len(rtts) < count:
                message = await ws.recv()
                now = time.perf_counter()
                data = message.encode() if isinstance(message, str) else message
                rtts.append(now - sent.pop(_cseq(data)))

        receiver = asyncio.create_task(receive())
        await _paced(ws.send, rate, count, "WSS", sent)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(receiver, 10.0)
    return rtts, count - len(rtts)


async def run_wss_wsproto(port: int, rate: float, count: int) -> tuple[list[float], int]:
    """As :func:`run_wss`, with wsproto's client codec over the same asyncio TLS streams as :func:`run_tls`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_context())
    ws = WSConnection(ConnectionType.CLIENT)
    writer.write(ws.send(Request(host="127.0.0.1", target="/", subprotocols=["sip"])))
    while not any(isinstance(event, AcceptConnection) for event in ws.events()):
        ws.receive_data(await reader.read(65536))
    sent: dict[int, float] = {}
    rtts: list[float] = []

    async def send(text: str) -> None:
        writer.write(ws.send(TextMessage(data=text)))

    async def receive() -> None:
        parts: list[str] = []  # a message split over reads arrives as several TextMessage events
        while len(rtts) < count:
            data = await reader.read(65536)
            if not data:
                return
            now = time.perf_counter()
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        rtts.append(now - sent.pop(_cseq("".join(parts).encode())))
                        parts = []

    receiver = asyncio.create_task(receive())
    await _paced(send, rate, count, "WSS", sent)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receiver, 10.0)
    writer.close()
    return rtts, count - len(rtts)


async def open_idle(port: int, count: int, concurrency: int) -> list[ClientConnection]:
    """``count`` WSS connections, upgraded and left idle (the library answers the transport's pings)."""
    gate = asyncio.Semaphore(concurrency)
    context = _client_context()

    async def one() -> ClientConnection | None:
        async with gate:
            try:
                return await connect(
                    f"wss://127.0.0.1:{port}/", ssl=context, subprotocols=[Subprotocol("sip")], compression=None,
                    ping_interval=None, proxy=None, open_timeout=30,
                )  # fmt: skip
            except (OSError, TimeoutError) as error:
                print(f"  connect failed: {error}", file=sys.stderr)
                return None

    opened = await asyncio.gather(*(one() for _ in range(count)))
    return [conn for conn in opened if conn is not None]


def codec_costs(count: int) -> dict[str, float]:
    """In-process microseconds per message: the WebSocket layer's feed and frame against the SIP framer's feed."""
    framer = WsFramer(WsLimits(65536, 65536))
    client = WSConnection(ConnectionType.CLIENT)
    [accept] = framer.feed(client.send(Request(host="127.0.0.1", target="/", subprotocols=["sip"])))
    assert isinstance(accept, WsControl)
    client.receive_data(accept.data)
    list(client.events())
    request = OPTIONS.format(via="WSS", host="wsbench.invalid", cseq=1)
    frame = client.send(TextMessage(data=request))
    answer = request.replace("OPTIONS sip:bench@127.0.0.1 SIP/2.0", "SIP/2.0 200 OK").encode()
    sip = Framer()
    timings = {}
    for name, step in (
        ("ws_feed_us", lambda: framer.feed(frame)),
        ("ws_frame_us", lambda: framer.frame(answer)),
        ("sip_feed_us", lambda: sip.feed(request.encode())),
    ):
        started = time.perf_counter()
        for _ in range(count):
            step()
        timings[name] = round((time.perf_counter() - started) / count * 1e6, 2)
    return timings


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def settled_rss(pid: int, seconds: float = 10.0) -> int:
    last = vm_rss_kib(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = vm_rss_kib(pid)
        if abs(now - last) <= max(64, last // 1000):
            return now
        last = now
    return last


class Sipwire:
    """A ``sipwire transport`` child on free loopback ports, stopped on exit (bench/regidle.py uses it too).

    ``config``: the TOML settings file's text; ``extra``: more command-line arguments (listeners, router).
    """

    def __init__(self, work: Path, threads: int, workers: int, config: str, extra: tuple[str, ...] = ()) -> None:
        config_path = work / "sipwire.toml"
        config_path.write_text(config)
        command = [
            sys.executable, "-m", "sipwire.cli", "transport", "--tcp", "127.0.0.1:0", "--tls", "127.0.0.1:0",
            *extra, "--threads", str(threads), "--workers", str(workers), "--instance", "wsbench",
            "--state-dir", str(work / "state"), "--config", str(config_path), "--log-level", "warning",
        ]  # fmt: skip
        self.log = open(work / "transport.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.control_path = work / "state" / "wsbench" / "control.sock"
        deadline = time.monotonic() + 20
        while True:
            try:
                self.health = self.control("health")
                if all(w["alive"] for w in self.control("stats")["workers"]):
                    break
            except Exception:  # not up yet
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
            time.sleep(0.1)
        listening = self.health["listening"]
        self.tls_port = int(listening["tls"].rpartition(":")[2])
        self.wss_port = int(listening["wss"].rpartition(":")[2]) if "wss" in listening else 0

    def control(self, op: str, **arguments: Any) -> Any:
        with ControlClient(self.control_path, timeout=10.0) as client:
            return client.request(op, **arguments)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


async def latency(server: Sipwire, args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"tls": [], "wss": []}
    lost = {"tls": 0, "wss": 0}
    cpu = {"tls": 0.0, "wss": 0.0}  # the transport process's CPU seconds while each ran alone
    wss = run_wss_wsproto if args.client == "wsproto" else run_wss
    runs = (("tls", run_tls, server.tls_port), ("wss", wss, server.wss_port))
    for round_index in range(args.rounds):
        if args.together:  # both connections at once: whatever else the machine does hits both alike
            results = await asyncio.gather(*(run(port, args.rate, args.messages) for _, run, port in runs))
        else:
            results = []
            for name, run, port in runs:
                before = cpu_seconds(server.process.pid)
                results.append(await run(port, args.rate, args.messages))
                cpu[name] += cpu_seconds(server.process.pid) - before
        for (name, _, _), (rtts, missing) in zip(runs, results, strict=True):
            samples[name] += rtts
            lost[name] += missing
            figures = _percentiles(rtts)
            print(f"  round {round_index + 1} {name.upper():>3}: p50 {figures['p50_ms']} ms, "
                  f"p99 {figures['p99_ms']} ms, max {figures['max_ms']} ms, lost {missing}")  # fmt: skip
    result = {name: {**_percentiles(values), "lost": lost[name]} for name, values in samples.items()}
    if not args.together:  # transport CPU per exchange (read, frame, dispatch, answer, write), in microseconds
        for name, figures in result.items():
            figures["transport_cpu_us"] = round(cpu[name] / max(1, len(samples[name])) * 1e6, 1)
    result["p99_ratio"] = round(result["wss"]["p99_ms"] / result["tls"]["p99_ms"], 3)
    return result


async def idle(server: Sipwire, args: argparse.Namespace) -> dict[str, Any]:
    pid = server.process.pid
    before = settled_rss(pid)
    pings_before = server.control("stats")["counters"].get("ws_pings_sent", 0)
    started = time.monotonic()
    conns = await open_idle(server.wss_port, args.idle, args.concurrency)
    opened_seconds = time.monotonic() - started
    print(f"  {len(conns)} WSS connections open in {opened_seconds:.1f} s; holding {args.hold} s")
    await asyncio.sleep(args.hold)
    after = vm_rss_kib(pid)
    still_open = sum(1 for conn in conns if conn.state is State.OPEN)
    stats = server.control("stats")
    counters = stats["counters"]
    for conn in conns:
        await conn.close()
    return {
        "requested": args.idle, "opened": len(conns), "still_open": still_open, "held_seconds": args.hold,
        "server_connections": stats["connections"], "rss_before_kib": before, "rss_after_kib": after,
        "kib_per_connection": round((after - before) / max(1, len(conns)), 2),
        "pings_sent": counters.get("ws_pings_sent", 0) - pings_before,
        "closed_ws_ping_timeout": counters.get("closed_ws_ping_timeout", 0),
        "open_seconds": round(opened_seconds, 1),
    }  # fmt: skip


async def main_async(args: argparse.Namespace, server: Sipwire) -> dict[str, Any]:
    result: dict[str, Any] = {"rate": args.rate, "messages": args.messages, "rounds": args.rounds,
                              "client": args.client, "together": args.together}  # fmt: skip
    if args.messages:
        order = "TLS and WSS at once" if args.together else "TLS then WSS"
        print(f"latency: {args.messages} OPTIONS at {args.rate}/s over one connection each, {order} "
              f"({args.client} client), {args.rounds} rounds")  # fmt: skip
        result["latency"] = await latency(server, args)
    if args.idle:
        print(f"idle: {args.idle} WSS connections, pinged every {args.ping_interval} s by the transport")
        result["idle"] = await idle(server, args)
    return result


def verdict(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    failures = []
    if "latency" in result:
        ratio = result["latency"]["p99_ratio"]
        if ratio > args.p99_ratio:
            failures.append(f"WSS p99 is {ratio}x TLS p99 (target <= {args.p99_ratio})")
        if result["latency"]["tls"]["lost"] or result["latency"]["wss"]["lost"]:
            failures.append("answers were lost")
    if "idle" in result:
        held = result["idle"]
        if held["kib_per_connection"] > args.idle_target_kib:
            failures.append(
                f"{held['kib_per_connection']} KiB per idle WSS connection (target <= {args.idle_target_kib})"
            )
        if held["still_open"] != held["requested"] or held["server_connections"] != held["requested"]:
            failures.append(f"{held['still_open']} of {held['requested']} idle connections held")
        if held["pings_sent"] < held["requested"]:
            failures.append(f"only {held['pings_sent']} pings for {held['requested']} connections")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500.0, help="messages per second on the one connection")
    parser.add_argument("--messages", type=int, default=10000, help="messages per transport per round (0: skip)")
    parser.add_argument("--rounds", type=int, default=2, help="TLS-then-WSS rounds")
    parser.add_argument(
        "--together", action="store_true", help="run the TLS and the WSS connection at the same time in each round"
    )
    parser.add_argument("--client", choices=("wsproto", "websockets"), default="wsproto", help="the WSS client")
    parser.add_argument("--idle", type=int, default=5000, help="idle WSS connections to hold (0: skip)")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds to hold them")
    parser.add_argument("--ping-interval", type=float, default=10.0, help="the transport's ws_ping_interval")
    parser.add_argument("--concurrency", type=int, default=100, help="upgrades in progress at once")
    parser.add_argument("--codec", type=int, default=20000, help="messages for the in-process codec timing (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--p99-ratio", type=float, default=1.2)
    parser.add_argument("--idle-target-kib", type=float, default=32.0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not (0 < args.rate <= 5000 and 0 <= args.messages <= 200_000 and 0 <= args.idle <= 20_000):
        parser.error("rate 1..5000, messages 0..200000, idle 0..20000")
    codec = codec_costs(args.codec) if args.codec else None
    if codec:
        print(f"codec, in-process, per message: {codec}")
    with tempfile.TemporaryDirectory(prefix="wsbench-") as work:
        config = f"max_connections = {args.idle + 64}\nws_ping_interval = {args.ping_interval}\nidle_timeout = 600.0\n"
        server = Sipwire(Path(work), args.threads, args.workers, config, ("--wss", "127.0.0.1:0"))
        try:
            result = asyncio.run(main_async(args, server))
            if codec:
                result["codec"] = codec
        finally:
            server.stop()
    failures = verdict(result, args)
    result["verdict"] = "FAIL: " + "; ".join(failures) if failures else "PASS"
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
