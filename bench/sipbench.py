#!/usr/bin/env python3
"""sipbench: SIP OPTIONS load, latency, CPU and idle-connection memory for a SIP-over-TCP/TLS server.

One *exchange* is one OPTIONS request answered by ``200 OK`` (bench/scenarios/options_uac.xml),
driven by sipp over TCP on 127.0.0.1; for ``--transport tls`` sipp talks plain TCP to a local
stunnel in client mode that carries each connection to the server's TLS port (sipp has no TLS).
Latency comes from sipp's ``-trace_rtt`` file with microsecond resolution (bench/fineclock.c is
built on demand and preloaded into sipp); CPU is read from /proc for the server's whole process
tree (and stunnel's, apart). Standard library only (plus the sipp, stunnel and openssl programs).

Fixed run, ramp and idle-connection modes can be combined; they run in that order::

    bench/sipbench.py --target 127.0.0.1:5060 --server-pid PID --conn t1 --rate 500 --calls 5000
    bench/sipbench.py --target 127.0.0.1:5060 --server-pid PID --ramp --rates 2000,4000,8000,16000
    bench/sipbench.py --start-sipwire --threads 1 --workers 1 --conn t1,tn --rate 500 --calls 5000 \\
        --ramp --idle-connections 10000
    bench/sipbench.py --start-sipwire --transport tls --cert-type rsa --conn tn --rate 200 --calls 2000 \\
        --set-tw-buckets --threads-sweep 1,2,4

See bench/README.md for what each figure means and the pitfalls.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCENARIO = HERE / "scenarios" / "options_uac.xml"
SHIM_SOURCE = HERE / "fineclock.c"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TW_SYSCTL = Path("/proc/sys/net/ipv4/tcp_max_tw_buckets")
TW_WANTED = 4096
LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1
SIPP_MAX_SOCKET = 16000
TCP_LISTEN = "0A"  # socket state in /proc/net/tcp


class BenchError(Exception):
    """A run could not be set up or completed; the message says why."""


def log(message: str) -> None:
    print(f"[sipbench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- children


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if sipbench dies, so nothing outlives a crashed run."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    # preexec_fn is only used before any helper thread exists or for a tiny prctl call.
    return subprocess.Popen(cmd, preexec_fn=_die_with_parent, **kwargs)  # noqa: PLW1509


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
    """Signal one child by its PID, wait, then SIGKILL it if it is still there."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} ignored signal {sig} for {grace:.0f}s: SIGKILL")
            proc.kill()
            proc.wait(5)
    return proc.returncode


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime of all threads
    start: int  # start time in ticks since boot (tells a reused PID apart)


def proc_stat(pid: int) -> ProcStat | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
    return ProcStat(pid, int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]))


def all_proc_stats() -> dict[int, ProcStat]:
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := proc_stat(int(entry.name))) is not None:
            stats[st.pid] = st
    return stats


def tree_pids(root: int, stats: dict[int, ProcStat]) -> list[int]:
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    found, todo = [], [root] if root in stats else []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def status_kib(pid: int, key: str = "VmRSS") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def tree_pss_kib(root: int) -> int:
    """Proportional set size of the whole tree: shared pages are split, not counted twice."""
    total = 0
    for pid in tree_pids(root, all_proc_stats()):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


def socket_fds(pid: int) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(entry.path).startswith("socket:"):
                    count += 1
    return count


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class TreeCpu:
    """utime+stime of process trees, sampled from /proc while a run is going on.

    Processes alive at start() count from their value then; processes that appear later count
    from zero. A process that exits keeps its last sampled value (so the sampling interval bounds
    what is lost). Groups are named, e.g. {"server": PID, "sipp": PID}.
    """

    def __init__(self, groups: dict[str, int], interval: float = 0.25, from_zero: tuple[str, ...] = ()) -> None:
        self.groups = groups
        self.from_zero = from_zero  # groups started just now: count their whole CPU time
        self.interval = interval
        self.seen: dict[str, dict[tuple[int, int], list[int]]] = {name: {} for name in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sipbench-cpu", daemon=True)
        self.t0 = self.t1 = 0.0
        self.busy0 = self.busy1 = (0, 0)

    def _sample(self, first: bool = False) -> None:
        stats = all_proc_stats()
        for name, root in self.groups.items():
            seen = self.seen[name]
            for pid in tree_pids(root, stats):
                st = stats[pid]
                key = (pid, st.start)
                if key in seen:
                    seen[key][1] = st.cpu_ticks
                else:
                    seen[key] = [st.cpu_ticks if first and name not in self.from_zero else 0, st.cpu_ticks]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> TreeCpu:
        self.t0, self.busy0 = time.monotonic(), machine_ticks()
        self._sample(first=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.t1, self.busy1 = time.monotonic(), machine_ticks()

    def seconds(self, name: str) -> float:
        return sum(last - first for first, last in self.seen[name].values()) / CLK_TCK

    def root_seconds(self, name: str) -> float:
        """The CPU of the group's root process alone (sipwire: the transport; its children are the workers)."""
        root = self.groups[name]
        return sum(last - first for (pid, _), (first, last) in self.seen[name].items() if pid == root) / CLK_TCK

    def pids(self, name: str) -> list[int]:
        return sorted(pid for pid, _ in self.seen[name])

    @property
    def wall(self) -> float:
        return max(self.t1 - self.t0, 1e-9)

    def machine_busy_pct(self) -> float:
        busy = self.busy1[0] - self.busy0[0]
        total = self.busy1[1] - self.busy0[1]
        return 100.0 * busy / total if total else 0.0


# --------------------------------------------------------------------------- host checks


def read_tw_buckets() -> int | None:
    try:
        return int(TW_SYSCTL.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def tw_buckets(apply: bool) -> Iterator[None]:
    """Check net.ipv4.tcp_max_tw_buckets for tn runs; optionally set 4096 and restore it afterwards."""
    old = read_tw_buckets()
    if old is None:
        log("cannot read net.ipv4.tcp_max_tw_buckets; tn runs may run out of client ports (TIME_WAIT)")
        yield
        return
    if old <= TW_WANTED:
        log(f"net.ipv4.tcp_max_tw_buckets = {old} (ok for tn runs)")
        yield
        return
    if not apply:
        log(
            f"WARNING: net.ipv4.tcp_max_tw_buckets = {old}. Every tn exchange leaves a client TIME_WAIT socket "
            "for 60 s; at hundreds of new connections/s sipp runs out of cheap ephemeral ports and its latency "
            "explodes (a client problem, not the server's). Before tn runs, as root:\n"
            f"    sysctl -w net.ipv4.tcp_max_tw_buckets={TW_WANTED}\n"
            f"and afterwards restore it with: sysctl -w net.ipv4.tcp_max_tw_buckets={old}\n"
            "(or pass --set-tw-buckets to let sipbench do both around its tn runs)"
        )
        yield
        return
    try:
        TW_SYSCTL.write_text(str(TW_WANTED))
    except OSError as error:
        log(f"cannot set tcp_max_tw_buckets ({error}); run as root: sysctl -w net.ipv4.tcp_max_tw_buckets={TW_WANTED}")
        yield
        return
    log(f"net.ipv4.tcp_max_tw_buckets: {old} -> {TW_WANTED} for the tn runs (restored afterwards)")
    try:
        yield
    finally:
        TW_SYSCTL.write_text(str(old))
        log(f"net.ipv4.tcp_max_tw_buckets restored to {read_tw_buckets()}")


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit up to the hard limit (inherited by sipp and a started sipwire)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (sipp's local and control ports)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOOPBACK, port))
                except OSError:
                    continue
        return int(port)
    raise BenchError("no free local port")


def build_shim(work: Path) -> Path | None:
    """Compile bench/fineclock.c into the work directory (once per source version)."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        log("WARNING: no gcc: sipp runs without the clock shim, response times are quantised to the kernel tick")
        return None
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:12]
    lib = work / f"libfineclock-{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(".tmp")
        result = subprocess.run(
            [compiler, "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-o", str(tmp), str(SHIM_SOURCE), "-ldl"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            log(f"WARNING: building the clock shim failed, running without it:\n{result.stderr}")
            return None
        tmp.rename(lib)
    return lib


# --------------------------------------------------------------------------- TLS: certificate and stunnel


def generate_cert(work: Path, kind: str) -> tuple[Path, Path]:
    """A self-signed server certificate (RSA-2048 or ECDSA P-256) in WORK/certs, reused if present.

    Made with `openssl req` so that sipwire and any other server (Kamailio, OpenSIPS) can be given
    the very same files; SAN IP:127.0.0.1 and DNS:localhost, key mode 0600.
    """
    certs = work / "certs"
    cert, key = certs / f"server-{kind}.crt", certs / f"server-{kind}.key"
    if cert.exists() and key.exists():
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BenchError("--cert-type needs the openssl program (Debian: apt-get install openssl)")
    certs.mkdir(parents=True, exist_ok=True)
    newkey = ["-newkey", "rsa:2048"] if kind == "rsa" else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    cmd = [openssl, "req", "-x509", *newkey, "-nodes", "-sha256", "-days", "825"]
    cmd += ["-keyout", str(key), "-out", str(cert), "-subj", f"/CN=sipbench {kind} test server"]
    cmd += ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"openssl req failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    key.chmod(0o600)
    return cert, key


def cert_summary(cert: Path) -> str:
    """One line about a certificate's key (for the log): e.g. 'RSA 2048 bit' or 'EC P-256'."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return "?"
    cmd = [openssl, "x509", "-in", str(cert), "-noout", "-text"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    algo = re.search(r"Public Key Algorithm: (\S+)", out.stdout)
    size = re.search(r"Public-Key: \((\d+) bit\)", out.stdout)
    curve = re.search(r"NIST CURVE: (\S+)", out.stdout)
    names = {"rsaEncryption": "RSA", "id-ecPublicKey": "ECDSA"}
    kind = names.get(algo.group(1), algo.group(1)) if algo else "?"
    parts = [kind, f"{size.group(1)} bit" if size else "", curve.group(1) if curve else ""]
    return " ".join(p for p in parts if p)


def tcp_listening(port: int, host: str = LOOPBACK) -> bool:
    """Is some socket listening on host:port? Read from /proc/net/tcp (connecting would start a TLS handshake)."""
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[1] == want and fields[3] == TCP_LISTEN:
                return True
    return False


class Stunnel:
    """stunnel in client mode for one run: plain TCP from sipp on a free 127.0.0.1 port -> TLS to the server.

    Settings (see bench/README.md): TLS 1.2 minimum, no certificate verification (self-signed test
    certificates), ``sessionResume = no`` so every new connection is a FULL handshake (``--tls-resume``:
    yes), ``TIMEOUTclose = 0`` (no thread per closed connection waiting for close_notify), ``debug = 3``
    (errors only: the default logs every connection, which costs CPU at hundreds of connections/s),
    foreground (its PID is the one we started; it gets PR_SET_PDEATHSIG like every child).
    """

    def __init__(self, rundir: Path, connect: str, resume: bool) -> None:
        exe = shutil.which("stunnel") or shutil.which("stunnel4")
        if exe is None:
            raise BenchError("--transport tls needs stunnel (Debian: apt-get install stunnel4)")
        self.exe = exe
        self.rundir = rundir
        self.port = free_port()
        self.accept = f"{LOOPBACK}:{self.port}"
        self.conf = rundir / "stunnel.conf"
        self.log_path = rundir / "stunnel.log"
        self.conf.write_text(
            "; written by sipbench for one run: sipp (plain TCP) -> this stunnel (client) -> server TLS port\n"
            "foreground = yes\n"
            "pid =\n"
            "syslog = no\n"
            "debug = 3\n"
            f"output = {self.log_path}\n"
            "[sipbench]\n"
            "client = yes\n"
            f"accept = {self.accept}\n"
            f"connect = {connect}\n"
            "sslVersionMin = TLSv1.2\n"
            "verifyChain = no\n"
            f"sessionResume = {'yes' if resume else 'no'}\n"
            "TIMEOUTclose = 0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> None:
        with open(self.rundir / "stunnel.stderr", "wb") as err:
            self.proc = spawn(
                [self.exe, str(self.conf)],
                cwd=self.rundir,
                stdout=err,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if tcp_listening(self.port):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"stunnel did not listen on {self.accept} (rc {self.proc.returncode}): {self.tail()!r}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 5)

    def tail(self, size: int = 600) -> str:
        text = ""
        for path in (self.rundir / "stunnel.stderr", self.log_path):
            with contextlib.suppress(OSError):
                text += path.read_bytes()[-size:].decode("latin-1", "replace")
        return text.strip()[-size:]

    # Logged at error level but expected: no CA file (verifyChain = no), and one line per connection
    # that TIMEOUTclose = 0 closes without waiting for the server's close_notify.
    BENIGN = ("No trusted certificates found", "TIMEOUTclose exceeded")

    def error_lines(self) -> list[str]:
        """What stunnel logged during the run (debug = 3: errors only), minus the expected lines."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if re.search(r" LOG[0-3]\[", ln) and not any(b in ln for b in self.BENIGN)]


# --------------------------------------------------------------------------- sipp runs


def percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def rtt_divisor(calls: int, ceiling: int = 1000) -> int:
    """sipp flushes -trace_rtt every -rtt_freq calls and drops the remainder: use a divisor of calls."""
    for freq in range(min(ceiling, calls), 0, -1):
        if calls % freq == 0:
            return freq
    return 1


@dataclass
class LoadResult:
    label: str
    conn: str
    rate: int
    calls: int
    transport: str = "tcp"
    sipp_rc: int | None = None
    outgoing: int = 0
    successful: int = 0
    failed: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    achieved: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    server_root_cpu_s: float = 0.0  # of server_cpu_s, the root process's own (sipwire: the transport process)
    sipp_cpu_s: float = 0.0
    stunnel_cpu_s: float = 0.0
    machine_busy_pct: float = 0.0
    server_pids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rundir: str = ""
    verdict: str = ""
    # sipwire only (--start-sipwire, tls): its handshake histogram and counters, difference over this run
    server_tls: dict[str, Any] = field(default_factory=dict)

    @property
    def conn_label(self) -> str:
        return f"{self.transport}/{self.conn}"

    @property
    def server_cpu_pct(self) -> float:
        return 100.0 * self.server_cpu_s / self.wall_s if self.wall_s else math.nan

    @property
    def stunnel_cpu_pct(self) -> float:
        return 100.0 * self.stunnel_cpu_s / self.wall_s if self.wall_s else math.nan

    @property
    def stunnel_us_per_exchange(self) -> float:
        return 1e6 * self.stunnel_cpu_s / self.successful if self.successful else math.nan

    @property
    def sipp_cpu_pct(self) -> float:
        return 100.0 * self.sipp_cpu_s / self.wall_s if self.wall_s else math.nan

    @property
    def others_cpu_pct(self) -> float:
        """CPU used by everything else on the host during the run, in % of one core (a busy-host warning)."""
        others = self.machine_busy_pct * (os.cpu_count() or 1) - self.server_cpu_pct - self.sipp_cpu_pct
        others -= self.stunnel_cpu_pct if self.transport == "tls" else 0.0
        return max(0.0, others)

    @property
    def us_per_exchange(self) -> float:
        return 1e6 * self.server_cpu_s / self.successful if self.successful else math.nan

    @property
    def root_us_per_exchange(self) -> float:
        """The server root process's share of :attr:`us_per_exchange`; the rest is its children's."""
        return 1e6 * self.server_root_cpu_s / self.successful if self.successful else math.nan

    def passes(self, p99_max_ms: float, min_fraction: float = 0.95) -> bool:
        return (
            self.failed == 0
            and self.sipp_rc == 0
            and self.samples > 0
            and self.achieved >= min_fraction * self.rate
            and self.latency_ms.get("p99", math.inf) <= p99_max_ms
        )


def parse_stat_file(path: Path) -> dict[str, str]:
    """Last line of sipp's -trace_stat CSV as {column: value} (cumulative columns end in '(C)')."""
    try:
        lines = [line for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    return dict(zip(lines[0].split(";"), lines[-1].split(";"), strict=False))


def parse_rtt_files(rundir: Path) -> tuple[list[float], float]:
    """(sorted response times in ms, achieved exchanges/s) from sipp's *_rtt.csv files."""
    rtts: list[float] = []
    first_start, last_stop = math.inf, -math.inf
    for path in rundir.glob("*_rtt.csv"):
        for line in path.read_text().splitlines():
            parts = line.split(";")
            if len(parts) < 2 or not parts[0][:1].isdigit():
                continue
            stop, rtt = float(parts[0]), float(parts[1])
            rtts.append(rtt)
            first_start = min(first_start, stop - rtt)
            last_stop = max(last_stop, stop)
    rtts.sort()
    span_s = (last_stop - first_start) / 1000.0 if rtts else 0.0
    return rtts, (len(rtts) / span_s if span_s > 0 else 0.0)


def looks_quantised(rtts: list[float], tick_ms: float = 4.0) -> bool:
    if len(rtts) < 50:
        return False
    return all(abs(v / tick_ms - round(v / tick_ms)) < 1e-6 for v in rtts[:: max(1, len(rtts) // 500)])


def handshake_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """sipwire's TLS handshake histogram and counters over one run: `ctl stats` after minus before.

    The histogram (``tls_handshake_ms``: cumulative buckets with upper bounds ``le`` in ms, from accept
    to handshake done, measured by the server) only has bucket resolution, so a percentile here is
    the upper bound of the first bucket that holds it: "p99 5" means 99 % of handshakes took <= 5 ms.
    """
    hist_b, hist_a = before.get("tls_handshake_ms"), after.get("tls_handshake_ms")
    if not isinstance(hist_a, dict) or not isinstance(hist_b, dict):
        return {"error": str(after.get("error") or before.get("error") or "no tls_handshake_ms in ctl stats")}
    old = {str(b["le"]): b["count"] for b in hist_b.get("buckets", [])}
    buckets = [{"le": b["le"], "count": b["count"] - old.get(str(b["le"]), 0)} for b in hist_a.get("buckets", [])]
    total = buckets[-1]["count"] if buckets else 0
    out: dict[str, Any] = {"count": total, "buckets": buckets}
    for name, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        rank = math.ceil(fraction * total)
        out[name] = next((b["le"] for b in buckets if total and b["count"] >= rank), None)
    counters_b, counters_a = before.get("counters", {}), after.get("counters", {})
    out["handshakes"] = counters_a.get("tls_handshakes", 0) - counters_b.get("tls_handshakes", 0)
    out["failed"] = {
        name.split(".", 1)[1]: value - counters_b.get(name, 0)
        for name, value in sorted(counters_a.items())
        if name.startswith("tls_handshake_failed.") and value - counters_b.get(name, 0)
    }
    return out


def bound(value: Any) -> str:
    """A histogram upper bound for printing: 2.0 -> '<=2', '+Inf' -> '>last'."""
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"<={value:g}"
    return f"{value}"


def handshake_line(r: LoadResult) -> str:
    tls = r.server_tls
    if not tls:
        return ""
    if "error" in tls:
        return f"ctl stats failed: {tls['error']}"
    failed = ", ".join(f"{k} {v}" for k, v in tls["failed"].items()) or "none"
    return (
        f"{tls['count']} handshakes, p50 {bound(tls['p50'])} ms, p95 {bound(tls['p95'])} ms, "
        f"p99 {bound(tls['p99'])} ms; failed handshakes: {failed}"
    )


@dataclass
class Context:
    target: str  # the server's address for this transport (tls: its TLS port)
    server_pid: int | None
    work: Path
    shim: Path | None
    recv_timeout_ms: int
    profile: str | None = None
    profile_rate: int = 100
    runs: int = 0
    transport: str = "tcp"
    tls_resume: bool = False
    sipwire: Sipwire | None = None  # started by us: read its TLS handshake histogram around each tls run
    prefix: str = ""  # run directory prefix (one per --threads-sweep session)


def run_load(ctx: Context, conn: str, rate: int, calls: int, label: str, profile: bool = False) -> LoadResult:
    """One bounded sipp run: `calls` OPTIONS exchanges at `rate`/s over t1 or tn (tls: through stunnel)."""
    ctx.runs += 1
    rundir = ctx.work / f"{ctx.prefix}{ctx.runs:02d}-{label}"
    rundir.mkdir(parents=True)
    res = LoadResult(label=label, conn=conn, rate=rate, calls=calls, transport=ctx.transport, rundir=str(rundir))
    sipp = shutil.which("sipp")
    if sipp is None:
        raise BenchError("sipp not found (Debian: apt-get install sip-tester)")
    tls = ctx.transport == "tls"
    stunnel = Stunnel(rundir, ctx.target, ctx.tls_resume) if tls else None
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    max_socket = max(64, min(SIPP_MAX_SOCKET, nofile - 200))  # sipp refuses -max_socket >= ulimit -n
    budget_s = calls / rate + 30  # sipp's own global timeout: the run is bounded even if the server stalls
    options = {
        "-sf": str(SCENARIO),
        "-t": conn,
        "-i": LOOPBACK,
        "-p": str(free_port()),  # sipp's own listening port
        "-cp": str(free_port()),  # sipp's UDP control port: two sipp processes need different ones
        "-r": str(rate),
        "-rp": "1000",
        "-m": str(calls),
        "-max_socket": str(max_socket),
        "-recv_timeout": str(ctx.recv_timeout_ms),
        "-timeout": f"{math.ceil(budget_s)}s",
        "-rtt_freq": str(rtt_divisor(calls)),
        "-stf": "stat.csv",
        "-fd": "1",
        "-error_file": "errors.log",
        "-max_log_size": "1000000",
    }
    # The Request-URI and To name the server even when sipp's peer is the local stunnel; the Via says TLS
    # because that is the transport of the hop that reaches the server.
    keys = {"server": ctx.target, "via_transport": ctx.transport.upper(), "contact_transport": ctx.transport}
    flags = ["-nostdin", "-trace_rtt", "-trace_stat", "-trace_err"]
    flags += [item for name, value in keys.items() for item in ("-key", name, value)]
    env = dict(os.environ)
    if ctx.shim is not None:
        env["LD_PRELOAD"] = f"{ctx.shim} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(ctx.shim)
    spy = None
    tls_before = ctx.sipwire.ctl("stats") if tls and ctx.sipwire is not None else None
    try:
        sipp_peer = ctx.target
        if stunnel is not None:
            stunnel.start()
            sipp_peer = stunnel.accept
        cmd = [sipp, sipp_peer, *(item for pair in options.items() for item in pair), *flags]
        (rundir / "cmd.txt").write_text(" ".join(cmd) + "\n")
        with open(rundir / "sipp.out", "wb") as out:
            proc = spawn(cmd, cwd=rundir, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            groups = {"sipp": proc.pid}
            if ctx.server_pid:
                groups["server"] = ctx.server_pid
            if stunnel is not None:
                groups["stunnel"] = stunnel.pid  # idle since its start: counted from here, like the server
            meter = TreeCpu(groups, from_zero=("sipp",)).start()
            if profile and ctx.profile and ctx.server_pid:
                spy = start_profile(ctx, rundir)
            try:
                proc.wait(budget_s + 30)
            except subprocess.TimeoutExpired:
                res.notes.append("sipp overran its own -timeout: killed")
            finally:
                stop_process(proc, signal.SIGTERM, 5)
                meter.stop()
                if spy is not None:
                    finish_profile(spy, rundir)
    finally:
        if stunnel is not None:
            stunnel.stop()
    res.sipp_rc = proc.returncode
    res.wall_s = meter.wall
    res.sipp_cpu_s = meter.seconds("sipp")
    if stunnel is not None:
        res.stunnel_cpu_s = meter.seconds("stunnel")
        if problems := stunnel.error_lines():
            res.notes.append(f"stunnel logged {len(problems)} error lines ({stunnel.log_path}), last: {problems[-1]!r}")
    if tls_before is not None and ctx.sipwire is not None:
        res.server_tls = handshake_delta(tls_before, ctx.sipwire.ctl("stats"))
    if ctx.server_pid:
        res.server_cpu_s = meter.seconds("server")
        res.server_root_cpu_s = meter.root_seconds("server")
        res.server_pids = meter.pids("server")
    res.machine_busy_pct = meter.machine_busy_pct()
    stat = parse_stat_file(rundir / "stat.csv")

    def count(column: str) -> int:
        with contextlib.suppress(ValueError):
            return int(stat.get(column + "(C)", "0") or 0)
        return 0

    res.outgoing, res.successful, res.failed = count("OutgoingCall"), count("SuccessfulCall"), count("FailedCall")
    res.failure_kinds = {
        name[len("Failed") : -3]: int(value)
        for name, value in stat.items()
        if name.startswith("Failed") and name.endswith("(C)") and name != "FailedCall(C)" and value.isdigit()
        if int(value)
    }
    rtts, res.achieved = parse_rtt_files(rundir)
    res.samples = len(rtts)
    if rtts:
        res.latency_ms = {
            "min": rtts[0],
            "p50": percentile(rtts, 50),
            "p95": percentile(rtts, 95),
            "p99": percentile(rtts, 99),
            "max": rtts[-1],
            "mean": sum(rtts) / len(rtts),
        }
        if looks_quantised(rtts):
            res.notes.append("response times are multiples of 4 ms: the clock shim is not active")
    if res.samples < res.successful:
        res.notes.append(f"only {res.samples} rtt samples for {res.successful} successful calls")
    if res.sipp_rc not in (0, None):
        tail = (rundir / "sipp.out").read_bytes()[-600:].decode("latin-1", "replace")
        errors = rundir / "errors.log"
        err_tail = errors.read_bytes()[-600:].decode("latin-1", "replace") if errors.exists() else ""
        res.notes.append(f"sipp rc {res.sipp_rc}; sipp output tail: {tail.strip()[-300:]!r}")
        if err_tail:
            res.notes.append(f"sipp errors.log tail: {err_tail.strip()[-300:]!r}")
    return res


# --------------------------------------------------------------------------- output

COLUMNS = (
    ("run", 16),
    ("conn", 6),
    ("rate", 6),
    ("calls", 6),
    ("ok", 6),
    ("failed", 6),
    ("rc", 3),
    ("achieved/s", 10),
    ("min", 6),
    ("p50", 6),
    ("p95", 6),
    ("p99", 7),
    ("max", 7),
    ("srv CPU%", 8),
    ("us/exch", 7),
    ("sipp CPU%", 9),
    ("host busy%", 10),
    ("others%", 7),
)
TLS_COLUMNS = (("stunnel CPU%", 12), ("stunnel us/exch", 15))  # after us/exch, for tables with tls runs
TLS_AT = [name for name, _ in COLUMNS].index("us/exch") + 1


def fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table_columns(with_tls: bool) -> list[tuple[str, int]]:
    columns = list(COLUMNS)
    if with_tls:
        columns[TLS_AT:TLS_AT] = TLS_COLUMNS
    return columns


def result_row(r: LoadResult, with_tls: bool = False) -> list[str]:
    lat = r.latency_ms
    row = [
        r.label,
        r.conn_label,
        str(r.rate),
        str(r.outgoing),
        str(r.successful),
        str(r.failed),
        str(r.sipp_rc),
        fmt(r.achieved, 1),
        *(fmt(lat.get(k, math.nan)) for k in ("min", "p50", "p95", "p99", "max")),
        fmt(r.server_cpu_pct, 1),
        fmt(r.us_per_exchange, 0),
        fmt(r.sipp_cpu_pct, 1),
        fmt(r.machine_busy_pct, 1),
        fmt(r.others_cpu_pct, 0),
    ]
    if with_tls:
        tls = r.transport == "tls"
        row[TLS_AT:TLS_AT] = [
            fmt(r.stunnel_cpu_pct, 1) if tls else "-",
            fmt(r.stunnel_us_per_exchange, 0) if tls else "-",
        ]
    return row


def print_rows(heads: list[str], widths: list[int], rows: list[list[str]]) -> None:
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def print_table(results: list[LoadResult], title: str, extra: Callable[[LoadResult], str] | None = None) -> None:
    with_tls = any(r.transport == "tls" for r in results)
    columns = table_columns(with_tls)
    heads = [name for name, _ in columns] + (["verdict"] if extra else [])
    widths = [width for _, width in columns] + ([7] if extra else [])
    rows = [result_row(r, with_tls) + ([extra(r)] if extra else []) for r in results]
    print(f"\n{title}  (latency ms from sipp -trace_rtt; CPU % of ONE core; us/exch = CPU us per exchange)")
    print_rows(heads, widths, rows)
    for r in results:
        if r.server_cpu_s:
            root, total = r.root_us_per_exchange, r.us_per_exchange
            print(
                f"  us/exch [{r.label}]: {fmt(root, 0)} root process (sipwire: the transport), "
                f"{fmt(total - root, 0)} its children (sipwire: the workers)"
            )
        for note in r.notes:
            print(f"  note [{r.label}]: {note}")
        if r.failure_kinds:
            print(f"  failures [{r.label}]: {r.failure_kinds}")
    if any(r.server_tls for r in results):
        print(
            "  sipwire TLS handshake time per run (server side, accept -> handshake done, from its ctl stats "
            "histogram; the percentiles are BUCKET UPPER BOUNDS, not exact values):"
        )
        for r in results:
            if r.server_tls:
                print(f"    {r.label}: {handshake_line(r)}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- ramp


def run_tag(transport: str, conn: str) -> str:
    return conn if transport == "tcp" else f"{transport}-{conn}"


def parse_rates(text: str) -> list[int]:
    return [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]


def run_ramp(ctx: Context, args: argparse.Namespace) -> tuple[list[LoadResult], int, int | None]:
    """Fixed-rate steps of --step seconds until one fails, then bisection between pass and fail."""
    results: list[LoadResult] = []
    best, first_fail = 0, None

    def step(rate: int) -> bool:
        label = f"ramp-{run_tag(ctx.transport, args.ramp_conn)}-{rate}"
        r = run_load(ctx, args.ramp_conn, rate, rate * args.step, label)
        ok = r.passes(args.p99_max)
        r.verdict = "PASS" if ok else "FAIL"
        results.append(r)
        stunnel = f", stunnel CPU {fmt(r.stunnel_cpu_pct, 0)} %" if r.transport == "tls" else ""
        log(
            f"ramp step {rate}/s: {r.verdict} (failed {r.failed}, rc {r.sipp_rc}, achieved {r.achieved:.0f}/s, "
            f"p99 {fmt(r.latency_ms.get('p99', math.nan))} ms, server CPU {fmt(r.server_cpu_pct, 0)} %{stunnel})"
        )
        if r.server_tls:
            log(f"  sipwire handshakes (ms, bucket upper bounds): {handshake_line(r)}")
        time.sleep(args.pause)
        return ok

    for rate in parse_rates(args.rates):
        if not step(rate):
            first_fail = rate
            break
        best = rate
    if first_fail is not None:
        lo, hi = best, first_fail
        for _ in range(args.bisect):
            mid = (lo + hi) // 2 // args.granularity * args.granularity
            if mid <= lo or mid >= hi:
                break
            if step(mid):
                lo = best = mid
            else:
                hi = first_fail = mid
    return results, best, first_fail


# --------------------------------------------------------------------------- idle connections


@dataclass
class IdleResult:
    requested: int
    opened: int = 0
    connect_failures: int = 0
    still_open: int = 0
    rss_pid: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    rss_after_close_kib: int | None = None
    tree_pss_before_kib: int = 0
    tree_pss_after_kib: int = 0
    server_socket_fds_before: int = 0
    server_socket_fds_after: int = 0
    open_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def per_conn_kib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.still_open if self.still_open else math.nan

    @property
    def pss_per_conn_kib(self) -> float:
        return (self.tree_pss_after_kib - self.tree_pss_before_kib) / self.still_open if self.still_open else math.nan


def _connect_batch(host: str, port: int, n: int, timeout: float) -> tuple[list[socket.socket], int]:
    pending: dict[int, socket.socket] = {}
    poller = select.poll()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        pending[s.fileno()] = s
        poller.register(s.fileno(), select.POLLOUT)
    done: list[socket.socket] = []
    failures = 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            s = pending.pop(fd)
            poller.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                done.append(s)
            else:
                failures += 1
                s.close()
    failures += len(pending)
    for s in pending.values():
        s.close()
    return done, failures


def _count_open(socks: list[socket.socket]) -> int:
    """Sockets the server has not closed: no EOF (RDHUP), hang-up or error pending on them.

    Plain readable data does not count as closed: a TLS 1.3 server sends session tickets
    after the handshake, which an idle client never reads.
    """
    rdhup = getattr(select, "POLLRDHUP", 0)
    poller = select.poll()
    for s in socks:
        poller.register(s.fileno(), (rdhup or select.POLLIN) | select.POLLHUP | select.POLLERR)
    closed = len(poller.poll(0))
    return len(socks) - closed


def _settle_rss(pid: int, seconds: float) -> int:
    """Wait until VmRSS stops moving (or `seconds` pass) and return it."""
    last = status_kib(pid) or 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = status_kib(pid) or 0
        if abs(now - last) <= max(64, last // 1000):
            return now
        last = now
    return last


def _handshake_all(socks: list[socket.socket], timeout: float) -> tuple[list[socket.socket], int]:
    """Complete a TLS client handshake on each connected socket (no verification: a memory test)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    done: list[socket.socket] = []
    failures = 0
    for s in socks:
        s.setblocking(True)
        s.settimeout(timeout)
        try:
            done.append(context.wrap_socket(s))
        except OSError:  # ssl.SSLError is an OSError
            failures += 1
            s.close()
    return done, failures


def run_idle(
    host: str, port: int, n: int, rss_pid: int, tree_root: int, batch: int = 500, tls: bool = False
) -> IdleResult:
    res = IdleResult(requested=n, rss_pid=rss_pid)
    soft = raise_nofile(n + 1000)
    if soft < n + 100:
        raise BenchError(f"RLIMIT_NOFILE is {soft}: cannot open {n} connections (raise the hard limit, ulimit -Hn)")
    res.rss_before_kib = _settle_rss(rss_pid, 5)
    res.tree_pss_before_kib = tree_pss_kib(tree_root)
    res.server_socket_fds_before = socket_fds(rss_pid)
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        while len(socks) + res.connect_failures < n:
            done, failed = _connect_batch(host, port, min(batch, n - len(socks) - res.connect_failures), 10.0)
            if tls:
                done, handshake_failures = _handshake_all(done, 10.0)
                failed += handshake_failures
            socks += done
            res.connect_failures += failed
            if failed and not done:
                res.notes.append(f"connects stopped succeeding after {len(socks)}")
                break
        res.opened = len(socks)
        res.open_seconds = time.monotonic() - t0
        # wait until the server holds them all (accept() may lag behind the kernel's backlog)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and socket_fds(rss_pid) < res.server_socket_fds_before + res.opened:
            time.sleep(0.25)
        res.rss_after_kib = _settle_rss(rss_pid, 10)
        res.tree_pss_after_kib = tree_pss_kib(tree_root)
        res.server_socket_fds_after = socket_fds(rss_pid)
        res.still_open = _count_open(socks)
        if res.still_open < res.opened:
            res.notes.append(
                f"the server closed {res.opened - res.still_open} of the idle connections "
                "(connection limit? for sipwire set SIPWIRE_MAX_CONNECTIONS above N)"
            )
        if res.server_socket_fds_after - res.server_socket_fds_before < res.opened * 0.99:
            res.notes.append(
                f"pid {rss_pid} holds only {res.server_socket_fds_after - res.server_socket_fds_before} new sockets "
                f"for {res.opened} connections (another process of the server may hold them: see --rss-pid)"
            )
    finally:
        for s in socks:
            s.close()
    time.sleep(2)
    res.rss_after_close_kib = status_kib(rss_pid)
    return res


def print_idle(res: IdleResult, target_kib: float) -> None:
    verdict = "PASS" if res.still_open >= res.requested and res.per_conn_kib <= target_kib else "FAIL"
    print(f"\nidle connections (transport pid {res.rss_pid} VmRSS; connections held open while measured)")
    print(
        f"  requested {res.requested}, opened {res.opened} in {res.open_seconds:.1f}s, connect failures "
        f"{res.connect_failures}, still open at measurement {res.still_open}"
    )
    print(
        f"  server socket fds {res.server_socket_fds_before} -> {res.server_socket_fds_after}; "
        f"VmRSS {res.rss_before_kib} -> {res.rss_after_kib} KiB "
        f"(after closing them: {res.rss_after_close_kib} KiB)"
    )
    print(
        f"  RSS growth per connection: {fmt(res.per_conn_kib)} KiB (target <= {target_kib:g} KiB: {verdict}); "
        f"whole-tree PSS growth per connection: {fmt(res.pss_per_conn_kib)} KiB"
    )
    for note in res.notes:
        print(f"  note: {note}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- py-spy


def start_profile(ctx: Context, rundir: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy")
    if spy is None or ctx.server_pid is None:
        log("py-spy not found: no profile")
        return None
    out = rundir / "profile.speedscope.json"
    cmd = [spy, "record", "--pid", str(ctx.server_pid), "--subprocesses", "--nonblocking"]
    cmd += ["--rate", str(ctx.profile_rate), "--format", "speedscope", "-o", str(out)]
    with open(rundir / "py-spy.log", "wb") as logf:
        proc = spawn(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    time.sleep(0.5)  # let py-spy attach before the load starts mattering
    return proc


def finish_profile(proc: subprocess.Popen[bytes], rundir: Path) -> None:
    stop_process(proc, signal.SIGINT, 30)  # py-spy writes its file on SIGINT
    out = rundir / "profile.speedscope.json"
    if not out.exists():
        log(f"py-spy wrote no profile; see {rundir / 'py-spy.log'}")


WAIT_FRAMES = ("Selector.select", "Event.wait", "Condition.wait", "Queue.get", "sleep")


def summarise_profile(path: Path, root_pid: int | None, top: int = 12) -> str:
    """Top functions and lines per process from a py-spy speedscope file.

    Samples whose innermost frame is a wait (selector.select, Event.wait...) are counted apart:
    py-spy --nonblocking cannot always tell an idle thread from a busy one. The percentages are
    of the *busy* samples of that process (all its threads together).
    """
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]

    def label(frame: dict[str, Any], with_line: bool) -> str:
        short = "/".join(Path(frame.get("file") or "?").parts[-2:])
        return f"{frame['name']} ({short}:{frame.get('line')})" if with_line else f"{frame['name']} ({short})"

    stats: dict[str, dict[str, Counter[str]]] = {}
    for prof in data["profiles"]:
        match = re.match(r"Process (\d+) Thread (\d+)", prof["name"])
        pid = int(match.group(1)) if match else 0
        pname = "transport" if pid == root_pid else f"worker/child pid {pid}"
        bucket = stats.setdefault(pname, {"self": Counter(), "incl": Counter(), "line": Counter(), "n": Counter()})
        for stack in prof["samples"]:
            chain = [frames[i] for i in stack if not frames[i]["name"].startswith("process ")]
            if not chain:
                continue
            if chain[-1]["name"].endswith(WAIT_FRAMES):
                bucket["n"]["wait"] += 1
                continue
            bucket["n"]["busy"] += 1
            bucket["self"][label(chain[-1], False)] += 1
            bucket["line"][label(chain[-1], True)] += 1
            for name in {label(f, False) for f in chain}:
                bucket["incl"][name] += 1
    lines = []
    for pname, bucket in sorted(stats.items()):
        busy, wait = bucket["n"]["busy"], bucket["n"]["wait"]
        if not busy:
            continue
        lines.append(f"  {pname}: {busy} busy samples (+{wait} in selector/event waits, left out)")
        for title, key in (("self %", "self"), ("line %", "line")):
            lines.append(f"    {title}  {'function' if key == 'self' else 'hottest lines (self)'}")
            lines += [f"    {100.0 * c / busy:6.1f}  {name}" for name, c in bucket[key].most_common(top)]
        lines.append("    incl %  function (frames in >= 95 % of samples left out)")
        incl = [(name, c) for name, c in bucket["incl"].most_common() if c < 0.95 * busy][:top]
        lines += [f"    {100.0 * c / busy:6.1f}  {name}" for name, c in incl]
    return "\n".join(lines)


# --------------------------------------------------------------------------- sipwire


class Sipwire:
    """`sipwire transport` on a free 127.0.0.1 port, torn down by PID with nothing left behind."""

    def __init__(
        self,
        work: Path,
        threads: int,
        workers: int,
        env_extra: dict[str, str],
        extra_args: list[str],
        tls: bool = False,
        cert: tuple[Path, Path] | None = None,
        log_name: str = "sipwire.log",
    ):
        self.work = work
        self.instance = f"sipbench-{os.getpid()}"
        self.state_dir = work / "sipwire-state"
        self.log_path = work / log_name
        self.tls = tls
        exe = shutil.which("sipwire")
        base = [exe] if exe else [sys.executable, "-m", "sipwire.cli"]
        tls_args = ["--tls", f"{LOOPBACK}:0"] if tls else []
        if tls and cert is not None:
            tls_args += ["--tls-cert", str(cert[0]), "--tls-key", str(cert[1])]
        self.cmd = [
            *base,
            "transport",
            "--tcp",
            f"{LOOPBACK}:0",
            "--threads",
            str(threads),
            "--workers",
            str(workers),
            "--instance",
            self.instance,
            "--state-dir",
            str(self.state_dir),
            *tls_args,
            *extra_args,
        ]
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p)
        # tcp runs: sipwire's TLS listener defaults to 127.0.0.1:5061, which a reference server (or a
        # second sipwire) may hold: off unless SIPWIRE_TLS is exported. tls runs: --tls 127.0.0.1:0 (the
        # flag wins over the variable) and the chosen port is read from the log.
        if not tls:
            self.env.setdefault("SIPWIRE_TLS", "")
        self.env.update(env_extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.tls_address = ""
        self.certificate = ""
        self.known: set[tuple[int, int]] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        log(f"starting: {' '.join(self.cmd)}")
        with open(self.log_path, "wb") as logf:
            self.proc = spawn(self.cmd, cwd=self.work, env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            tcp = re.search(r"listening on tcp (\S+)", text)
            tls = re.search(r"listening on tls (\S+)", text)
            if tcp and "transport ready" in text:
                if self.tls and not tls:
                    self.stop()
                    raise BenchError(f"sipwire started without a TLS listener (log {self.log_path})")
                self.address = tcp.group(1)
                self.tls_address = tls.group(1) if tls else ""
                if cert := re.search(r"TLS certificate (.+?), SHA-256", text):
                    self.certificate = cert.group(1)
                break
            if self.proc.poll() is not None:
                raise BenchError(f"sipwire exited with {self.proc.returncode}:\n{text[-2000:]}")
            time.sleep(0.1)
        else:
            self.stop()
            raise BenchError(f"sipwire did not become ready in {timeout:.0f}s (log {self.log_path})")
        self.remember()
        where = self.address + (f", tls {self.tls_address} (certificate {self.certificate})" if self.tls else "")
        log(f"sipwire pid {self.pid} listening on tcp {where}, processes {sorted(p for p, _ in self.known)}")

    def remember(self) -> None:
        stats = all_proc_stats()
        self.known |= {(pid, stats[pid].start) for pid in tree_pids(self.pid, stats)}

    def ctl(self, *action: str) -> Any:
        exe = shutil.which("sipwire")
        base = [exe] if exe else [sys.executable, "-m", "sipwire.cli"]
        cmd = [*base, "ctl", "--instance", self.instance, "--state-dir", str(self.state_dir), *action, "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=self.env, check=False)
        if out.returncode != 0:
            return {"error": out.stderr.strip()}
        return json.loads(out.stdout)

    def stop(self) -> list[int]:
        """SIGTERM the transport, wait, SIGKILL if needed; then make sure every process it had is gone."""
        if self.proc is None:
            return []
        with contextlib.suppress(Exception):
            self.remember()
        rc = stop_process(self.proc, signal.SIGTERM, 15)
        log(f"sipwire pid {self.pid} exited with {rc}")
        leftovers = []
        deadline = time.monotonic() + 5
        for pid, start in sorted(self.known):
            while (st := proc_stat(pid)) is not None and st.start == start and time.monotonic() < deadline:
                time.sleep(0.1)
            st = proc_stat(pid)
            if st is not None and st.start == start and pid != self.pid:
                leftovers.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if leftovers:
            log(f"WARNING: sipwire left processes behind after its exit, killed by PID: {leftovers}")
        return leftovers

    def log_problems(self, limit: int = 15) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        bad = [ln for ln in lines if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", ln)]
        return bad[:limit] + ([f"... {len(bad) - limit} more"] if len(bad) > limit else [])


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sipbench",
        description="SIP OPTIONS load (sipp), latency, server CPU and idle-connection memory; loopback only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tgt = p.add_argument_group("server under test")
    tgt.add_argument(
        "--target", metavar="HOST:PORT", help="the server's TCP address, or its TLS address with --transport tls"
    )
    tgt.add_argument("--server-pid", type=int, help="root PID of the server: its whole process tree is accounted")
    tgt.add_argument("--rss-pid", type=int, help="process whose VmRSS the idle test reads (default: --server-pid)")
    tgt.add_argument("--start-sipwire", action="store_true", help="start `sipwire transport` on a free port, stop it")
    tgt.add_argument("--threads", type=int, default=1, help="--start-sipwire: I/O threads")
    tgt.add_argument(
        "--threads-sweep",
        metavar="N,N,..",
        help="--start-sipwire: repeat the fixed run(s)/ramp once per I/O thread count (sipwire restarted each "
        "time, --threads ignored) and print one summary table",
    )
    tgt.add_argument("--workers", type=int, default=1, help="--start-sipwire: worker processes")
    tgt.add_argument("--sipwire-arg", action="append", default=[], help="--start-sipwire: extra argument (repeat)")
    tls = p.add_argument_group("TLS (sipp -> local stunnel client -> the server's TLS port)")
    tls.add_argument("--transport", choices=("tcp", "tls"), default="tcp", help="transport of the fixed runs and ramp")
    tls.add_argument(
        "--tls-resume",
        action="store_true",
        help="stunnel sessionResume = yes (default no: every connection is a FULL handshake)",
    )
    tls.add_argument("--cert", type=Path, metavar="FILE", help="--start-sipwire: PEM certificate (sipwire --tls-cert)")
    tls.add_argument("--key", type=Path, metavar="FILE", help="--start-sipwire: PEM key of --cert (--tls-key)")
    tls.add_argument(
        "--cert-type",
        choices=("rsa", "ecdsa"),
        help="generate a self-signed RSA-2048 or ECDSA P-256 certificate in WORK/certs (reused if there), give it "
        "to the started sipwire and print its paths for other servers; alone (with --work-dir): only generate it. "
        "Default for sipwire: its own generated ECDSA P-256 dev certificate",
    )
    fixed = p.add_argument_group("fixed run(s)")
    fixed.add_argument("--conn", help="t1 (one connection) or tn (new connection per exchange); 't1,tn' runs both")
    fixed.add_argument("--rate", type=int, default=500, help="exchanges per second")
    fixed.add_argument("--calls", type=int, default=5000, help="exchanges per fixed run")
    ramp = p.add_argument_group("ramp")
    ramp.add_argument("--ramp", action="store_true", help="find the highest rate that passes")
    ramp.add_argument("--ramp-conn", choices=("t1", "tn"), default="t1")
    ramp.add_argument("--rates", default="1000,2000,4000,8000,16000", help="rising step rates")
    ramp.add_argument("--step", type=int, default=10, help="seconds per step (calls = rate * step)")
    ramp.add_argument("--bisect", type=int, default=3, help="bisection steps after the first failing rate")
    ramp.add_argument("--granularity", type=int, default=100, help="bisection rates are multiples of this")
    ramp.add_argument("--p99-max", type=float, default=100.0, help="PASS needs p99 <= this many ms")
    idle = p.add_argument_group("idle connections")
    idle.add_argument("--idle-connections", type=int, metavar="N", help="hold N idle TCP connections, measure RSS")
    idle.add_argument("--idle-target-kib", type=float, default=10.0, help="PASS if RSS growth per connection <= this")
    misc = p.add_argument_group("misc")
    misc.add_argument("--recv-timeout", type=int, default=5000, help="ms to wait for a 200 before a call fails")
    misc.add_argument("--pause", type=float, default=2.0, help="seconds between runs")
    misc.add_argument("--set-tw-buckets", action="store_true", help="tn: set tcp_max_tw_buckets=4096, then restore")
    misc.add_argument("--profile", action="store_true", help="py-spy record the server during the fixed runs")
    misc.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    misc.add_argument("--work-dir", type=Path, help="raw sipp files go here (default: a new temp directory)")
    misc.add_argument("--json", type=Path, metavar="FILE", help="write every result as JSON")
    args = p.parse_args(argv)
    conns = [c for c in re.split(r"[,\s]+", args.conn or "") if c]
    if any(c not in ("t1", "tn") for c in conns):
        p.error("--conn takes t1, tn or t1,tn")
    args.conns = conns
    args.load = bool(conns or args.ramp or args.idle_connections)
    if not args.load and not args.cert_type:
        p.error("nothing to do: give --conn (fixed run), --ramp and/or --idle-connections (or only --cert-type)")
    if args.load and args.start_sipwire == bool(args.target):
        p.error("give either --target HOST:PORT (with --server-pid) or --start-sipwire")
    if args.target and not args.target.startswith(LOOPBACK + ":"):
        p.error("loopback only: --target must be 127.0.0.1:PORT")
    if args.rate <= 0 or args.calls <= 0 or args.step <= 0:
        p.error("--rate, --calls and --step must be positive")
    if bool(args.cert) != bool(args.key):
        p.error("--cert and --key go together")
    if args.cert and args.cert_type:
        p.error("give either --cert/--key or --cert-type")
    if args.cert and not args.start_sipwire:
        p.error("--cert/--key are for --start-sipwire (a server you started yourself has its own certificate)")
    for path in (args.cert, args.key):
        if path is not None and not path.is_file():
            p.error(f"no such file: {path}")
    if args.tls_resume and args.transport != "tls":
        p.error("--tls-resume needs --transport tls")
    if args.idle_connections and args.transport == "tls" and not args.start_sipwire:
        p.error("the TLS idle test needs --start-sipwire (it reads the TLS port from sipwire's log)")
    args.sweep = []
    if args.threads_sweep:
        if not args.start_sipwire:
            p.error("--threads-sweep needs --start-sipwire")
        try:
            args.sweep = [int(v) for v in re.split(r"[,\s]+", args.threads_sweep.strip()) if v]
        except ValueError:
            p.error("--threads-sweep takes I/O thread counts, e.g. 1,2,4")
        if not args.sweep or min(args.sweep) < 1:
            p.error("--threads-sweep takes I/O thread counts >= 1, e.g. 1,2,4")
    return args


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Session:
    """Everything run against one server (one sipwire start when sipbench starts it)."""

    threads: int | None
    fixed: list[LoadResult] = field(default_factory=list)
    ramp: list[LoadResult] = field(default_factory=list)
    best: int = 0
    first_fail: int | None = None


def run_session(
    args: argparse.Namespace,
    work: Path,
    shim: Path | None,
    cert: tuple[Path, Path] | None,
    threads: int | None,
    report: dict[str, Any],
) -> Session:
    """Fixed runs, ramp and idle test against one server; starts and stops sipwire around them if asked."""
    session = Session(threads=threads)
    sweep = bool(args.sweep)
    tls = args.transport == "tls"
    target, server_pid, tcp_address = args.target, args.server_pid, args.target
    sipwire = None
    try:
        if args.start_sipwire:
            env_extra = {}
            if args.idle_connections:
                env_extra["SIPWIRE_MAX_CONNECTIONS"] = str(max(2048, args.idle_connections + 2000))
            sipwire = Sipwire(
                work,
                threads or args.threads,
                args.workers,
                env_extra,
                args.sipwire_arg,
                tls=tls,
                cert=cert,
                log_name=f"sipwire-threads{threads}.log" if sweep else "sipwire.log",
            )
            sipwire.start()
            tcp_address, server_pid = sipwire.address, sipwire.pid
            target = sipwire.tls_address if tls else sipwire.address
            report["sipwire"] = {
                "cmd": sipwire.cmd,
                "pid": sipwire.pid,
                "tcp": sipwire.address,
                "tls": sipwire.tls_address,
                "certificate": sipwire.certificate,
            }
        if server_pid is None:
            log("no --server-pid: server CPU is not measured")
        elif proc_stat(server_pid) is None:
            raise BenchError(f"no process {server_pid}")
        ctx = Context(
            target=target,
            server_pid=server_pid,
            work=work,
            shim=shim,
            recv_timeout_ms=args.recv_timeout,
            profile="yes" if args.profile else None,
            profile_rate=args.profile_rate,
            transport=args.transport,
            tls_resume=args.tls_resume,
            sipwire=sipwire,
            prefix=f"threads{threads}-" if sweep else "",
        )
        where = f"{target} ({args.transport}" + (f", sipwire --threads {threads})" if sweep else ")")
        for conn in args.conns:
            label = f"{run_tag(args.transport, conn)}-{args.rate}"
            r = run_load(ctx, conn, args.rate, args.calls, label, profile=args.profile)
            session.fixed.append(r)
            log(f"{r.label}: {r.successful} ok, {r.failed} failed, sipp rc {r.sipp_rc}; raw files {r.rundir}")
            if r.server_tls:
                log(f"  sipwire handshakes (ms, bucket upper bounds): {handshake_line(r)}")
            time.sleep(args.pause)
        if session.fixed:
            print_table(session.fixed, f"fixed runs against {where}")
            if args.profile:
                for r in session.fixed:
                    prof = Path(r.rundir) / "profile.speedscope.json"
                    if prof.exists():
                        print(f"\npy-spy profile of {r.label} ({prof}):")
                        print(summarise_profile(prof, server_pid))
        report["fixed"] = [asdict(r) | derived(r) for r in session.fixed]
        if args.ramp:
            session.ramp, session.best, session.first_fail = run_ramp(ctx, args)
            print_table(session.ramp, f"ramp {args.ramp_conn} against {where}", extra=lambda r: r.verdict)
            print(
                f"\nhighest passing rate: {session.best}/s"
                + (
                    f" (first failing rate {session.first_fail}/s)"
                    if session.first_fail
                    else " (every step passed: raise --rates)"
                )
                + f"; PASS = 0 failed, sipp rc 0, achieved >= 95 % of target, p99 <= {args.p99_max:g} ms, "
                f"{args.step} s steps"
            )
            report["ramp"] = {
                "steps": [asdict(r) | derived(r) for r in session.ramp],
                "best": session.best,
                "first_fail": session.first_fail,
            }
        if args.idle_connections:
            if server_pid is None:
                raise BenchError("--idle-connections needs --server-pid (or --start-sipwire)")
            time.sleep(args.pause)
            host, port = (target if tls else tcp_address).rsplit(":", 1)
            idle = run_idle(host, int(port), args.idle_connections, args.rss_pid or server_pid, server_pid, tls=tls)
            print_idle(idle, args.idle_target_kib)
            report["idle"] = asdict(idle) | {
                "per_conn_kib": idle.per_conn_kib,
                "pss_per_conn_kib": idle.pss_per_conn_kib,
            }
    finally:
        if sipwire is not None:
            if sipwire.proc is not None and sipwire.proc.poll() is None:
                report["sipwire_stats"] = stats = sipwire.ctl("stats")
                if "error" in stats:
                    print(f"\nsipwire ctl stats failed at the end: {stats['error']}")
                else:
                    print(f"\nsipwire counters at the end: {json.dumps(stats.get('counters'), sort_keys=True)}")
                if tls and isinstance(stats.get("tls_handshake_ms"), dict):
                    hist = stats["tls_handshake_ms"]
                    print(
                        f"sipwire TLS handshakes over its whole life: {hist.get('count')}, "
                        f"p50 {bound(hist.get('p50'))} p95 {bound(hist.get('p95'))} p99 {bound(hist.get('p99'))} ms "
                        "(bucket upper bounds)"
                    )
            report["sipwire_leftovers"] = sipwire.stop()
            problems = sipwire.log_problems()
            report["sipwire_log_problems"] = problems
            print(f"sipwire log ({sipwire.log_path}): {len(problems)} warning/error lines")
            for line in problems:
                print(f"  {line}")
    return session


def print_sweep(sessions: list[Session], args: argparse.Namespace) -> None:
    """One table for --threads-sweep: a row per thread count and fixed run, plus the ramp's best step."""
    with_tls = args.transport == "tls"
    columns = table_columns(with_tls)
    heads = ["threads"] + [name for name, _ in columns]
    widths = [7] + [width for _, width in columns]
    if with_tls:
        heads += ["hs p50", "hs p95", "hs p99"]
        widths += [6, 6, 6]
    with_ramp = any(session.ramp for session in sessions)
    if with_ramp:
        heads.append("ramp")
        widths.append(4)
    rows = []

    def row(session: Session, r: LoadResult, ramp: str) -> list[str]:
        cells = [str(session.threads), *result_row(r, with_tls)]
        if with_tls:
            cells += [bound(r.server_tls.get(k)) if r.server_tls else "-" for k in ("p50", "p95", "p99")]
        return [*cells, ramp] if with_ramp else cells

    for session in sessions:
        rows += [row(session, r, "") for r in session.fixed]
        if session.ramp:
            best = next((r for r in session.ramp if r.rate == session.best and r.verdict == "PASS"), None)
            fail = f", first fail {session.first_fail}/s" if session.first_fail else ", all passed"
            if best is not None:
                rows.append(row(session, best, f"best {session.best}/s{fail}"))
            else:
                rows.append(row(session, session.ramp[0], f"no step passed{fail}"))
    print(
        f"\n--threads-sweep {args.threads_sweep}: sipwire restarted per I/O thread count, --workers {args.workers}, "
        f"{args.transport}  (latency ms; CPU % of ONE core; hs = sipwire TLS handshake ms, bucket upper bounds; "
        "ramp rows show the highest passing step)"
    )
    print_rows(heads, widths, rows)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sipbench-"))
    work.mkdir(parents=True, exist_ok=True)
    raise_nofile(max(20000, (args.idle_connections or 0) + 1000))
    load1, _, _ = os.getloadavg()
    log(f"work dir {work}; {os.cpu_count()} CPUs, load average {load1:.2f}")
    if load1 > 0.5:
        log("NOTE: the machine is not idle: treat the figures as indicative")
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "started": time.time()}
    sessions: list[Session] = []
    session_reports: list[dict[str, Any]] = []
    rc = 0
    try:
        cert = (args.cert, args.key) if args.cert else None
        if args.cert_type:
            cert = generate_cert(work, args.cert_type)
            report["certificate"] = {"type": args.cert_type, "cert": str(cert[0]), "key": str(cert[1])}
            log(
                f"{args.cert_type} test certificate ({cert_summary(cert[0])}, self-signed, SAN 127.0.0.1):\n"
                f"    certificate {cert[0]}\n    key         {cert[1]}\n"
                "  give the same two files to any other server you compare (e.g. Kamailio tls.cfg "
                "certificate/private_key)"
            )
        elif cert is not None:
            log(f"certificate {cert[0]} ({cert_summary(cert[0])}), key {cert[1]}")
        elif args.start_sipwire and args.transport == "tls":
            log("certificate: sipwire's own generated development certificate (ECDSA P-256)")
        if not args.load:
            return 0
        shim = build_shim(work)
        needs_tn = "tn" in args.conns or (args.ramp and args.ramp_conn == "tn")
        with tw_buckets(args.set_tw_buckets) if needs_tn else contextlib.nullcontext():
            for threads in args.sweep or [args.threads if args.start_sipwire else None]:
                session_reports.append({"threads": threads})
                sessions.append(run_session(args, work, shim, cert, threads, session_reports[-1]))
                if args.sweep and threads != args.sweep[-1]:
                    time.sleep(args.pause)
    except BenchError as error:
        log(f"ERROR: {error}")
        rc = 1
    except KeyboardInterrupt as stop:
        log(f"interrupted ({stop}): cleaning up")
        rc = 130
    finally:
        if args.sweep and sessions:
            print_sweep(sessions, args)
        if args.sweep:
            report["sweep"] = session_reports
        elif session_reports:
            report |= session_reports[0]
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
            log(f"results written to {args.json}")
    return rc


def derived(r: LoadResult) -> dict[str, float]:
    return {
        "server_cpu_pct": r.server_cpu_pct,
        "us_per_exchange": r.us_per_exchange,
        "root_us_per_exchange": r.root_us_per_exchange,
        "sipp_cpu_pct": r.sipp_cpu_pct,
        "stunnel_cpu_pct": r.stunnel_cpu_pct,
        "stunnel_us_per_exchange": r.stunnel_us_per_exchange,
        "others_cpu_pct": r.others_cpu_pct,
    }


if __name__ == "__main__":
    sys.exit(main())
