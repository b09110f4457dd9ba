#!/usr/bin/env python3
"""fairness: does a handful of abusive peers starve a well-behaved SIP client on the same I/O thread?

One well-behaved client (sipp with the clock shim, bench/scenarios/options_uac.xml: OPTIONS -> 200
at a modest fixed rate over ONE TCP connection) is measured twice per server, alternately:

  (a) ``alone``    the client by itself;
  (b) ``abusers``  the same client while 20 abusive peers hit the same server from child processes:
                   * ``flooders`` pipeline OPTIONS as fast as the socket accepts them and read and
                     discard the answers (so they are never stuck on send: they cost the server
                     reads, framing, dispatch and writes at its full speed);
                   * ``non-readers`` send OPTIONS, each followed by an RFC 5626 CRLFCRLF ping, as
                     fast as the socket accepts them and never read, so their answers (and pongs)
                     pile up on the server.

The question is the client's p50/p95/p99/max and failed calls in (b) against (a). Servers, in the
same run: sipwire (started here: ``--threads 1 --workers 1``, one process doing SIP work) and the
team's Kamailio 5.6 anchor (/work/shared/bench/kamailio, ``tcp_children=1``), the reference.
Per run it also reports the abusers' requests sent and answered, the server's CPU (its whole
process tree, from /proc) and its memory (PSS of the tree) before, at its peak and at the end.

Everything stays on 127.0.0.1 and is bounded: sipp gets ``-m CALLS`` and a global timeout (see
sipbench), every abuser stops by itself at a hard deadline (and on SIGTERM, which the parent sends
when the client is done, or which PR_SET_PDEATHSIG delivers if the parent dies) and closes all its
sockets. The default set (2 servers x 2 scenarios x 30 s) takes about 2.5 minutes.

    python3 bench/fairness.py
    python3 bench/fairness.py --calls 6000 --rate 200 --json /tmp/fairness.json
    python3 bench/fairness.py --skip-kamailio --repeat 2        # or SKIP_KAMAILIO=1

See docs/BENCHMARKS.md ("Fairness under abusive peers") for figures and bench/README.md for sipbench,
whose helpers (sipp run, clock shim, /proc CPU, sipwire start/stop) this script imports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import sipbench as sb  # noqa: E402

# --------------------------------------------------------------------------- bounds and defaults

DEFAULT_RATE = 200  # client OPTIONS/s: modest, far below what either server handles alone
DEFAULT_CALLS = 6000  # 30 s at 200/s: enough samples for a stable p99 (60 above it)
DEFAULT_FLOODERS = 10  # the "20 flooding / non-reading peers", split evenly
DEFAULT_NON_READERS = 10
WARMUP_S = 2.0  # abusers start this long before the client, so it meets them at full strength
ABUSER_SLACK_S = 40.0  # an abuser's own hard deadline beyond the client's planned duration
ABUSER_STOP_GRACE_S = 10.0  # after SIGTERM an abuser must have closed its sockets and reported
BATCH = 32  # requests per send buffer an abuser builds (one send() moves ~12-14 KB)
RECV_CHUNK = 256 * 1024  # a flooder reads and discards at most this much per readable event
CONNECT_TIMEOUT_S = 2.0  # an abuser's connect() on loopback; a refused peer retries after the pause
RECONNECT_PAUSE_S = 0.2  # an abuser the server closed reconnects after this pause (until the deadline)
SELECT_TICK_S = 0.1  # how often an abuser looks at its stop flag, deadline and reconnect times
MEMORY_SAMPLE_S = 0.5  # PSS of the server tree is sampled this often for the peak
QUIET_CPU_PCT = 5.0  # between runs: the server counts as drained below this CPU % (of one core)
QUIET_WINDOW_S = 0.5  # ... measured over this window
QUIET_MAX_S = 20.0  # ... waiting at most this long (then the next run starts anyway, with a note)
RECV_TIMEOUT_MS = 5000  # sipp fails a call whose 200 takes longer (sipbench's default)
KAMAILIO_PORTS = (5060, 5061)  # fixed by the shared anchor cfg (TCP, TLS)
KAMAILIO_LOG_LINES = 3  # last lines of Kamailio's log shown per run when it logged anything
SIP_STATUS = b"SIP/2.0 "  # each answer starts with its status line
SIP_OK = b"SIP/2.0 200 "
PING = b"\r\n\r\n"  # RFC 5626 keep-alive; the server owes a CRLF pong
SCENARIOS = ("alone", "abusers")


def log(message: str) -> None:
    print(f"[fairness {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- the abusers (child process)


@dataclass
class AbuseTally:
    """What one abuser process did; printed as JSON on its stdout for the parent."""

    kind: str
    peers: int
    connects: int = 0
    connect_errors: int = 0
    closed_by_server: int = 0
    requests_sent: int = 0  # OPTIONS fully handed to the kernel
    pings_sent: int = 0
    answers: int = 0  # status lines read back (flooders only: non-readers never read)
    answers_200: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


def request_template(kind: str, peer: int, server: str, local: str) -> bytes:
    """One OPTIONS with three ``%d`` slots (branch, Call-ID, CSeq), so a batch costs one %-format each.

    Every request is a new transaction (own branch and Call-ID): a server must not be able to treat
    the flood as retransmissions.
    """
    tag = f"{kind[0]}{peer}"
    return (
        f"OPTIONS sip:bench@{server} SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP {local};branch=z9hG4bK-{tag}-%d;rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:abuser@{local}>;tag={tag}\r\n"
        f"To: <sip:bench@{server}>\r\n"
        f"Call-ID: {tag}-%d@fairness\r\n"
        "CSeq: %d OPTIONS\r\n"
        "User-Agent: fairness-abuser\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class Peer:
    """One abusive TCP connection (reconnected when the server closes it)."""

    def __init__(self, index: int, kind: str, target: tuple[str, int]) -> None:
        self.index = index
        self.kind = kind
        self.target = target
        self.sock: socket.socket | None = None
        self.template = b""
        self.serial = 0
        self.out = memoryview(b"")
        self.out_requests = 0  # requests in self.out: counted when the whole buffer is sent
        self.tail = b""  # end of the previous read: a status line may straddle two reads
        self.reconnect_at = 0.0

    @property
    def reads(self) -> bool:
        return self.kind == "flooder"

    def connect(self, tally: AbuseTally) -> bool:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(self.target)
        except OSError as error:
            sock.close()
            tally.connect_errors += 1
            tally.errors[type(error).__name__] = tally.errors.get(type(error).__name__, 0) + 1
            self.reconnect_at = time.monotonic() + RECONNECT_PAUSE_S
            return False
        sock.setblocking(False)
        local = "{}:{}".format(*sock.getsockname())
        self.template = request_template(self.kind, self.index, "{}:{}".format(*self.target), local)
        self.sock, self.out, self.out_requests, self.tail = sock, memoryview(b""), 0, b""
        tally.connects += 1
        return True

    def next_batch(self) -> None:
        """BATCH new requests (non-readers: each followed by a CRLFCRLF ping)."""
        suffix = b"" if self.reads else PING
        first, self.serial = self.serial, self.serial + BATCH
        self.out = memoryview(b"".join(self.template % (n, n, n) + suffix for n in range(first, self.serial)))
        self.out_requests = BATCH

    def on_writable(self, tally: AbuseTally) -> None:
        assert self.sock is not None
        if not self.out:
            self.next_batch()
        sent = self.sock.send(self.out)
        self.out = self.out[sent:]
        if not self.out:
            tally.requests_sent += self.out_requests
            tally.pings_sent += 0 if self.reads else self.out_requests

    def on_readable(self, tally: AbuseTally) -> bool:
        """Read and count answers; False when the server closed the connection."""
        assert self.sock is not None
        data = self.sock.recv(RECV_CHUNK)
        if not data:
            return False
        window = self.tail + data
        tally.answers += window.count(SIP_STATUS)
        tally.answers_200 += window.count(SIP_OK)
        self.tail = window[-(len(SIP_OK) - 1) :]  # too short to hold a whole status line: no double count
        return True


class AbuserLoop:
    """All peers of one kind in one process, driven by a selector until SIGTERM or the deadline."""

    def __init__(self, kind: str, target: tuple[str, int], peers: int, deadline_s: float) -> None:
        self.tally = AbuseTally(kind=kind, peers=peers)
        self.peers = [Peer(i, kind, target) for i in range(peers)]
        self.selector = selectors.DefaultSelector()
        self.deadline = time.monotonic() + deadline_s
        self.stopping = False

    def attach(self, peer: Peer) -> None:
        if peer.connect(self.tally):
            assert peer.sock is not None
            events = selectors.EVENT_WRITE | (selectors.EVENT_READ if peer.reads else 0)
            self.selector.register(peer.sock, events, peer)

    def detach(self, peer: Peer, reason: str) -> None:
        """The server closed (or reset) this peer: count it, reconnect after a pause."""
        if peer.sock is not None:
            self.selector.unregister(peer.sock)
            peer.sock.close()
            peer.sock = None
        self.tally.closed_by_server += 1
        self.tally.errors[reason] = self.tally.errors.get(reason, 0) + 1
        peer.reconnect_at = time.monotonic() + RECONNECT_PAUSE_S

    def serve(self, peer: Peer, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not peer.on_readable(self.tally):
                self.detach(peer, "eof")
                return
            if mask & selectors.EVENT_WRITE:
                peer.on_writable(self.tally)
        except BlockingIOError:
            pass
        except OSError as error:
            self.detach(peer, type(error).__name__)

    def run(self) -> AbuseTally:
        started, cpu0 = time.monotonic(), time.process_time()
        for peer in self.peers:
            self.attach(peer)
        while not self.stopping and time.monotonic() < self.deadline:
            for key, mask in self.selector.select(SELECT_TICK_S):
                self.serve(key.data, mask)
            now = time.monotonic()
            for peer in self.peers:
                if peer.sock is None and now >= peer.reconnect_at and not self.stopping:
                    self.attach(peer)
        for peer in self.peers:
            if peer.sock is not None:
                peer.sock.close()
        self.selector.close()
        self.tally.seconds = time.monotonic() - started
        self.tally.cpu_s = time.process_time() - cpu0
        return self.tally


def abuser_main(kind: str, target: str, peers: int, deadline_s: float) -> int:
    """Entry point of an abuser child: run, then print the tally as one JSON line."""
    host, port = target.rsplit(":", 1)
    loop = AbuserLoop(kind, (host, int(port)), peers, deadline_s)

    def stop(signum: int, frame: object) -> None:
        loop.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps(asdict(loop.run())), flush=True)
    return 0


# --------------------------------------------------------------------------- the abusers (parent side)


class AbuserGroup:
    """The abuser child processes of one run: one per kind, so neither kind waits on the other's Python."""

    def __init__(self, target: str, counts: dict[str, int], deadline_s: float, rundir: Path) -> None:
        self.target = target
        self.counts = {kind: n for kind, n in counts.items() if n > 0}
        self.deadline_s = deadline_s
        self.rundir = rundir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for kind, n in self.counts.items():
            cmd = [sys.executable, str(Path(__file__).resolve()), "--abuser", kind, "--target", self.target]
            cmd += ["--peers", str(n), "--deadline", f"{self.deadline_s:.0f}"]
            with open(self.rundir / f"abuser-{kind}.err", "wb") as err:
                self.procs[kind] = sb.spawn(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)

    def stop(self) -> list[AbuseTally]:
        """SIGTERM each child by PID, collect its tally (SIGKILL and an empty tally if it hangs)."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        tallies = []
        for kind, proc in self.procs.items():
            try:
                out, _ = proc.communicate(timeout=ABUSER_STOP_GRACE_S)
                tallies.append(AbuseTally(**json.loads(out.decode().strip().splitlines()[-1])))
            except (subprocess.TimeoutExpired, ValueError, IndexError) as error:
                sb.stop_process(proc, signal.SIGKILL, 5)
                log(f"WARNING: abuser {kind} pid {proc.pid} gave no tally ({error!r}); see {self.rundir}")
                tallies.append(AbuseTally(kind=kind, peers=self.counts[kind], errors={"no_tally": 1}))
        return tallies


# --------------------------------------------------------------------------- servers under test


class Server(Protocol):
    """A server measured by this script: started and stopped here, by PID only."""

    name: str
    target: str  # TCP host:port

    @property
    def pid(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def before_run(self) -> None: ...

    def while_loaded(self) -> list[str]: ...

    def after_run(self) -> list[str]: ...


class SipwireServer:
    """sipwire started by sipbench's helper on a free port; `ctl stats` gives its counters per run."""

    name = "sipwire"

    def __init__(self, work: Path, threads: int, workers: int) -> None:
        self.sipwire = sb.Sipwire(work, threads, workers, {}, [])
        self.target = ""
        self.counters: dict[str, int] = {}

    @property
    def pid(self) -> int:
        return self.sipwire.pid

    def start(self) -> None:
        self.sipwire.start()
        self.target = self.sipwire.address

    def stop(self) -> None:
        self.sipwire.stop()
        for line in self.sipwire.log_problems(limit=8):
            log(f"sipwire log: {line}")

    def _stats(self) -> dict[str, Any]:
        stats = self.sipwire.ctl("stats")
        return stats if isinstance(stats, dict) else {}

    def before_run(self) -> None:
        self.counters = dict(self._stats().get("counters", {}))

    def while_loaded(self) -> list[str]:
        """What is piled up inside sipwire right after the client's last exchange (abusers still on)."""
        stats = self._stats()
        keys = ("connections", "queue_depth", "dispatch_in_flight", "pending_write_bytes")
        return ["at the end: " + ", ".join(f"{k} {stats.get(k, '?')}" for k in keys)]

    def after_run(self) -> list[str]:
        """The counters that moved during the run (write outcomes, overload, closes...)."""
        after = self._stats().get("counters", {})
        moved = {k: v - self.counters.get(k, 0) for k, v in sorted(after.items()) if v != self.counters.get(k, 0)}
        return ["counters: " + ", ".join(f"{k} +{v}" for k, v in moved.items())] if moved else []


class KamailioServer:
    """The team's Kamailio anchor (shared harness, tcp_children=1), started and stopped by PID via kamctl.sh."""

    name = "kamailio"

    def __init__(self, shared: Path, work: Path) -> None:
        self.kamctl = shared / "kamailio" / "kamctl.sh"
        self.env = dict(os.environ, ANCHOR_WORK=str(work / "kamailio"), TCP_CHILDREN="1")
        self.log_path = work / "kamailio" / "kamailio.log"
        self.target = f"{sb.LOOPBACK}:{KAMAILIO_PORTS[0]}"
        self._pid = 0
        self.known: set[tuple[int, int]] = set()
        self.log_mark = 0

    @property
    def pid(self) -> int:
        return self._pid

    def start(self) -> None:
        if not self.kamctl.exists():
            raise sb.BenchError(f"no Kamailio harness at {self.kamctl} (--shared-bench)")
        busy = [port for port in KAMAILIO_PORTS if sb.tcp_listening(port)]
        if busy:
            raise sb.BenchError(
                f"127.0.0.1 port(s) {busy} already taken: another server runs there; not starting Kamailio"
            )
        out = subprocess.run(
            [str(self.kamctl), "start", "options"], env=self.env, capture_output=True, text=True, check=False
        )
        if out.returncode != 0 or not out.stdout.strip().isdigit():
            raise sb.BenchError(f"kamctl.sh start failed ({out.returncode}): {out.stderr.strip()[-800:]}")
        self._pid = int(out.stdout.strip())
        self.remember()
        log(f"Kamailio pid {self._pid} (tcp_children=1) on tcp {self.target}, processes {len(self.known)}")

    def remember(self) -> None:
        stats = sb.all_proc_stats()
        self.known |= {(pid, stats[pid].start) for pid in sb.tree_pids(self._pid, stats)}

    def stop(self) -> None:
        """kamctl.sh stop (SIGTERM to the main PID), then make sure no process of its tree survived."""
        if not self._pid:
            return
        self.remember()
        subprocess.run([str(self.kamctl), "stop"], env=self.env, capture_output=True, check=False)
        deadline = time.monotonic() + 5
        leftovers = []
        for pid, start in sorted(self.known):
            while (st := sb.proc_stat(pid)) is not None and st.start == start and time.monotonic() < deadline:
                time.sleep(0.1)
            if (st := sb.proc_stat(pid)) is not None and st.start == start:
                leftovers.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        log(f"Kamailio pid {self._pid} stopped" + (f"; killed leftovers by PID: {leftovers}" if leftovers else ""))
        self._pid = 0

    def _log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def before_run(self) -> None:
        self.remember()
        self.log_mark = len(self._log_lines())

    def while_loaded(self) -> list[str]:
        return []

    def after_run(self) -> list[str]:
        """How many lines Kamailio logged during the run (debug=1: notices and worse), and the last ones."""
        new = self._log_lines()[self.log_mark :]
        if not new:
            return []
        return [f"Kamailio logged {len(new)} lines, last: " + " | ".join(ln[-160:] for ln in new[-KAMAILIO_LOG_LINES:])]


# --------------------------------------------------------------------------- server CPU and memory


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(PSS, summed VmRSS) of a process tree. PSS splits shared pages (fair for Kamailio's shm)."""
    rss = sum(sb.status_kib(pid) or 0 for pid in sb.tree_pids(root, sb.all_proc_stats()))
    return sb.tree_pss_kib(root), rss


class MemoryPeak:
    """Samples the server tree's PSS in a thread during a run and keeps the highest value."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fairness-memory", daemon=True)

    def _loop(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, sb.tree_pss_kib(self.root))
            if self._stop.wait(MEMORY_SAMPLE_S):
                return

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tree_ticks(root: int) -> dict[tuple[int, int], int]:
    """CPU ticks per (pid, start time) of a process tree: a snapshot for per-process CPU shares."""
    stats = sb.all_proc_stats()
    return {(pid, stats[pid].start): stats[pid].cpu_ticks for pid in sb.tree_pids(root, stats)}


def busiest(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int], wall: float, root: int) -> str:
    """The server processes that used CPU in a window, busiest first: where the server's time went."""
    used = Counter({key: ticks - before.get(key, 0) for key, ticks in after.items()})
    parts = []
    for (pid, _), ticks in used.most_common(3):
        if ticks:
            role = "main" if pid == root else "child"
            parts.append(f"{role} {pid} {100.0 * ticks / sb.CLK_TCK / wall:.0f}%")
    return "CPU by process: " + ", ".join(parts) if parts else ""


def wait_quiet(root: int) -> float:
    """Wait until the server's tree is nearly idle (work left by the previous run drained); seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_MAX_S:
        before = sum(tree_ticks(root).values())
        time.sleep(QUIET_WINDOW_S)
        if 100.0 * (sum(tree_ticks(root).values()) - before) / sb.CLK_TCK / QUIET_WINDOW_S < QUIET_CPU_PCT:
            break
    return time.monotonic() - started


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One client run against one server, with or without the abusers."""

    server: str
    scenario: str
    load: sb.LoadResult
    abusers: list[AbuseTally] = field(default_factory=list)
    pss_kib_before: int = 0
    pss_kib_peak: int = 0
    pss_kib_end: int = 0  # right after the client's last exchange, abusers still connected
    pss_kib_after: int = 0  # once the abusers are gone and the server is quiet again
    rss_kib_end: int = 0  # summed VmRSS of the tree (counts shared pages once per process)
    settle_s: float = 0.0  # waited before the run for the server to be quiet
    drain_s: float = 0.0  # waited after it (abusers gone) before pss_kib_after
    notes: list[str] = field(default_factory=list)

    def abuse_sum(self, name: str) -> int:
        return sum(int(getattr(t, name)) for t in self.abusers)


def abusers_for(server: Server, ctx: sb.Context, args: argparse.Namespace) -> AbuserGroup:
    """The abuser children of the next run (not started), with a deadline that outlasts the client."""
    rundir = ctx.work / f"{ctx.prefix}{ctx.runs + 1:02d}-abuser-children"  # next to sipp's run dir
    rundir.mkdir(parents=True, exist_ok=True)
    deadline = WARMUP_S + args.calls / args.rate + ABUSER_SLACK_S
    counts = {"flooder": args.flooders, "non-reader": args.non_readers}
    return AbuserGroup(server.target, counts, deadline, rundir)


def measure_client(server: Server, ctx: sb.Context, res: RunResult, args: argparse.Namespace, loaded: bool) -> None:
    """The client's sipp run, the server's CPU per process over it, and its state and memory at the end."""
    ticks0, t0 = tree_ticks(server.pid), time.monotonic()
    profile = args.profile and isinstance(server, SipwireServer)
    res.load = sb.run_load(ctx, "t1", args.rate, args.calls, f"{server.name}-{res.scenario}", profile=profile)
    res.notes.append(busiest(ticks0, tree_ticks(server.pid), time.monotonic() - t0, server.pid))
    res.notes += server.while_loaded() if loaded else []
    res.pss_kib_end, res.rss_kib_end = tree_memory_kib(server.pid)


def run_once(server: Server, ctx: sb.Context, scenario: str, args: argparse.Namespace) -> RunResult:
    """One client run, alone or with the abusers (started before it, stopped right after it)."""
    res = RunResult(server.name, scenario, sb.LoadResult(label="", conn="t1", rate=args.rate, calls=args.calls))
    res.settle_s = wait_quiet(server.pid)
    if res.settle_s >= QUIET_MAX_S:
        res.notes.append(f"server still busy after {QUIET_MAX_S:.0f} s of waiting before the run")
    server.before_run()
    res.pss_kib_before, _ = tree_memory_kib(server.pid)
    group = abusers_for(server, ctx, args) if scenario == "abusers" else None
    with MemoryPeak(server.pid) as peak:
        try:
            if group is not None:
                group.start()  # stop() below also ends a group that failed half-way through its start
                time.sleep(WARMUP_S)
            measure_client(server, ctx, res, args, loaded=group is not None)
        finally:
            if group is not None:
                res.abusers = group.stop()
    res.pss_kib_peak = max(peak.peak_kib, res.pss_kib_end)
    res.drain_s = wait_quiet(server.pid)
    res.pss_kib_after, _ = tree_memory_kib(server.pid)
    if res.drain_s >= QUIET_MAX_S:
        res.notes.append(f"server still busy {QUIET_MAX_S:.0f} s after the run")
    res.notes += server.after_run()
    if (spy := Path(res.load.rundir) / "profile.speedscope.json").exists():
        print(f"\npy-spy profile of {server.name}/{scenario} ({spy}):\n{sb.summarise_profile(spy, server.pid)}")
    return res


def run_server(server: Server, work: Path, shim: Path | None, args: argparse.Namespace) -> list[RunResult]:
    """Start one server, run (alone, abusers) x repeat against it, stop it by PID whatever happens."""
    results: list[RunResult] = []
    try:
        server.start()
        ctx = sb.Context(target=server.target, server_pid=server.pid, work=work, shim=shim,
                         recv_timeout_ms=RECV_TIMEOUT_MS, prefix=f"{server.name}-",
                         profile="py-spy" if args.profile else None)  # fmt: skip
        for _ in range(args.repeat):
            for scenario in SCENARIOS:
                log(f"{server.name}: client {args.calls} calls at {args.rate}/s, {scenario}")
                results.append(run_once(server, ctx, scenario, args))
                print_rows(results[-1:])
    finally:
        server.stop()
    return results


# --------------------------------------------------------------------------- output

HEADS = ["server", "scenario", "calls", "failed", "p50", "p95", "p99", "max", "abuse sent", "answered (200)",
         "srv CPU%", "PSS MiB before/peak/end/after", "others%"]  # fmt: skip


def row(r: RunResult) -> list[str]:
    lat, load = r.load.latency_ms, r.load
    kibs = (r.pss_kib_before, r.pss_kib_peak, r.pss_kib_end, r.pss_kib_after)
    mib = "/".join(f"{kib / 1024:.0f}" for kib in kibs)
    abused = bool(r.abusers)
    return [
        r.server,
        r.scenario,
        str(load.outgoing),
        str(load.failed),
        *(sb.fmt(lat.get(k, float("nan"))) for k in ("p50", "p95", "p99", "max")),
        str(r.abuse_sum("requests_sent")) if abused else "-",
        f"{r.abuse_sum('answers')} ({r.abuse_sum('answers_200')})" if abused else "-",
        sb.fmt(load.server_cpu_pct, 0),
        mib,
        sb.fmt(load.others_cpu_pct, 0),
    ]


def print_rows(results: list[RunResult]) -> None:
    sb.print_rows(HEADS, [len(h) for h in HEADS], [row(r) for r in results])
    for r in results:
        for note in [*r.load.notes, *r.notes]:
            if note:
                print(f"  note [{r.server}/{r.scenario}]: {note}")
        if r.load.failure_kinds:
            print(f"  failures [{r.server}/{r.scenario}]: {r.load.failure_kinds}")
        for t in r.abusers:
            print(
                f"  abusers [{r.server}/{r.scenario}] {t.peers} {t.kind}s: {t.requests_sent} OPTIONS sent"
                f" ({t.requests_sent / max(t.seconds, 1e-9):.0f}/s), {t.pings_sent} pings, {t.answers} answers"
                f" ({t.answers_200} x 200), {t.connects} connects, {t.closed_by_server} closed by the server,"
                f" abuser CPU {100.0 * t.cpu_s / max(t.seconds, 1e-9):.0f}%"
                + (f", errors {t.errors}" if t.errors else "")
            )
    sys.stdout.flush()


def print_markdown(results: list[RunResult]) -> None:
    print("\n| " + " | ".join(HEADS) + " |")
    print("|" + "---|" * len(HEADS))
    for r in results:
        print("| " + " | ".join(row(r)) + " |")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def machine() -> dict[str, Any]:
    """What the figures were taken on, printed at the top and kept in the JSON."""

    def version(cmd: list[str], pattern: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            if found := re.search(pattern, out.stdout + out.stderr):
                return found.group(0)
        return "?"

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "sipp": version(["sipp", "-v"], r"v\d+\.\d+\.\d+[\w-]*"),
        "kamailio": version(["kamailio", "-v"], r"kamailio \d+\.\d+\.\d+"),
        "loadavg": os.getloadavg(),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fairness",
        description="A well-behaved sipp client's latency alone and with 20 abusive peers; sipwire and Kamailio.",
    )
    p.add_argument("--rate", type=int, default=DEFAULT_RATE, help="client OPTIONS per second (%(default)s)")
    p.add_argument("--calls", type=int, default=DEFAULT_CALLS, help="client exchanges per run (%(default)s)")
    p.add_argument("--flooders", type=int, default=DEFAULT_FLOODERS, help="pipelining peers (%(default)s)")
    p.add_argument("--non-readers", type=int, default=DEFAULT_NON_READERS, help="never-reading peers (%(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="times to run (alone, abusers) per server (%(default)s)")
    p.add_argument("--threads", type=int, default=1, help="sipwire I/O threads (%(default)s)")
    p.add_argument("--workers", type=int, default=1, help="sipwire workers (%(default)s: like Kamailio's one)")
    p.add_argument("--skip-kamailio", action="store_true", default=bool(os.environ.get("SKIP_KAMAILIO")),
                   help="measure sipwire only (also SKIP_KAMAILIO=1)")  # fmt: skip
    p.add_argument("--skip-sipwire", action="store_true", help="measure Kamailio only")
    shared = Path(os.environ.get("SHARED_BENCH", REPO.parent / "shared" / "bench"))
    p.add_argument("--shared-bench", type=Path, default=shared,
                   help="the team's shared harness (kamailio/kamctl.sh; also SHARED_BENCH); %(default)s")  # fmt: skip
    p.add_argument("--profile", action="store_true",
                   help="py-spy the sipwire runs (diagnosis only: py-spy's CPU disturbs the figures)")  # fmt: skip
    p.add_argument("--work-dir", type=Path, help="raw files of every run (default: a new /tmp/fairness-*)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    # an abuser child process (started by this script itself)
    p.add_argument("--abuser", choices=("flooder", "non-reader"), help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--peers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.calls <= 0 or args.repeat <= 0:
        p.error("--rate, --calls and --repeat must be positive")
    return args


def servers(args: argparse.Namespace, work: Path) -> list[Server]:
    chosen: list[Server] = []
    if not args.skip_kamailio:
        chosen.append(KamailioServer(args.shared_bench, work))
    if not args.skip_sipwire:
        chosen.append(SipwireServer(work, args.threads, args.workers))
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.abuser:
        return abuser_main(args.abuser, args.target, args.peers, args.deadline)
    signal.signal(signal.SIGTERM, sb._on_sigterm)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fairness-"))
    work.mkdir(parents=True, exist_ok=True)
    sb.raise_nofile(20000)
    info = machine()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    log(f"work dir {work}")
    if info["loadavg"][0] > 0.5:
        log("NOTE: the machine is not idle (see 'others%'): treat the figures as indicative")
    report: dict[str, Any] = {"command": sys.argv, "machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    results: list[RunResult] = []
    rc = 0
    try:
        shim = sb.build_shim(work)
        for server in servers(args, work):
            try:
                results += run_server(server, work, shim, args)
            except sb.BenchError as error:
                log(f"ERROR ({server.name}): {error}")
                rc = 1
    except KeyboardInterrupt as stop:
        log(f"interrupted ({stop}): cleaning up")
        rc = 130
    finally:
        if results:
            print(f"\nwell-behaved client: sipp t1, {args.rate}/s, {args.calls} calls; abusers: {args.flooders} "
                  f"flooders + {args.non_readers} non-readers; latency ms; CPU % of ONE core; 'answered' = flooders' "
                  "answers, of which 200 OK in brackets (non-readers never read)")  # fmt: skip
            print_rows(results)
            print_markdown(results)
        report["results"] = [asdict(r) | {"server_cpu_pct": r.load.server_cpu_pct} for r in results]
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
            log(f"results written to {args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
