"""consolebench: what the ops console costs, and how fast it answers and follows the transport.

Everything on 127.0.0.1, every step bounded in time. It starts its own ``sipwire transport``
(``--tcp 127.0.0.1:0``, no TLS, ``--threads 1 --workers 2`` by default, SIPWIRE_MAX_CONNECTIONS=12000,
a long idle timeout so the idle connections of step 2 stay open) and a ``sipwire console`` for it,
then measures:

1. **the cost of an open dashboard**: the same sipp load (``bench/sipbench.py --target ...
   --server-pid ...``, t1, a high fixed rate and a low latency rate) twice per rate, without any
   dashboard client and with one real headless Debian chromium on the overview page (it polls
   ``/api/stats`` every second and ``/api/health`` every 2 s through htmx). Achieved rate, p99,
   transport CPU per exchange, and the console's and chromium's own CPU. This is a fixed-rate
   comparison, not a full ramp: if the achieved rate falls short of the high rate the transport is
   saturated and the drop with a dashboard is its cost in throughput; if it keeps up, the change
   in transport CPU per exchange (and the console's extra CPU) is the cost estimate.
2. **latency under 10,000 idle connections**: ``GET /api/connections?limit=100`` (JSON), the
   ``/connections`` page (HTML), and the two htmx fragments the pages poll, sequentially.
3. **how fast the overview follows a change**: open N new connections (and, separately, resize
   the I/O pool with ``sipwire ctl ... threads 3``) and poll the overview fragment the page polls
   (``GET /api/stats`` with ``HX-Request: true``) until it shows the new figure. The page itself
   polls every second, so what an operator sees can lag by up to one more second.

    python3 bench/consolebench.py
    python3 bench/consolebench.py --high-rate 12000 --seconds 10 --idle 10000 --requests 200 --json /tmp/cb.json

Needs what sipbench needs (sipp, gcc), Debian's chromium (``/usr/bin/chromium``) and httpx.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import sipbench as sb  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]  # fmt: skip
LISTENING = re.compile(r"console listening on http://(\S+?)/")
CONNECTIONS_FIGURE = re.compile(r'data-testid="connections">\s*(\d+)')
THREADS_FIGURE = re.compile(r"I/O threads \((\d+)\)")
HTMX = {"HX-Request": "true"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[consolebench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tree_cpu_seconds(root: int) -> float:
    stats = sb.all_proc_stats()
    return sum(stats[pid].cpu_ticks for pid in sb.tree_pids(root, stats)) / CLK_TCK


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "n": len(ordered),
        "p50": round(sb.percentile(ordered, 50), 2),
        "p99": round(sb.percentile(ordered, 99), 2),
        "max": round(ordered[-1], 2),
    }


# --------------------------------------------------------------------------- processes


class Console:
    """``sipwire console`` on a free loopback port for one transport, stopped by its PID."""

    def __init__(self, work: Path, instance: str, state_dir: Path) -> None:
        self.log_path = work / "console.log"
        self.token = secrets.token_urlsafe(24)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(REPO)
        self.env["SIPWIRE_ADMIN_TOKEN"] = self.token
        self.env["SIPWIRE_CONSOLE_TOKEN_FILE"] = str(work / "console.token")
        self.cmd = [
            sys.executable, "-m", "sipwire.cli", "console", "--listen", "127.0.0.1:0", "--instance", instance,
            "--state-dir", str(state_dir),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> None:
        log(f"starting: {' '.join(self.cmd)}")
        with open(self.log_path, "wb") as log_file:
            self.proc = sb.spawn(self.cmd, cwd=REPO, env=self.env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            match = LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                url = f"http://{match.group(1)}"
                with contextlib.suppress(httpx.TransportError, ValueError):
                    if httpx.get(f"{url}/api/health", timeout=2.0).json().get("status") == "up":
                        self.url = url
                        log(f"console pid {self.proc.pid} at {url}")
                        return
            time.sleep(0.1)
        self.stop()
        raise sb.BenchError(f"console did not start: {self.log_path.read_text(errors='replace')[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            sb.stop_process(self.proc, signal.SIGTERM, 10)


class Browser:
    """Headless Debian chromium on one page; its whole process tree is ended by PID."""

    def __init__(self, work: Path, url: str) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=work))
        self.cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", url]
        self.proc: subprocess.Popen[bytes] | None = None
        self.known: set[tuple[int, int]] = set()

    def start(self) -> None:
        log(f"starting: {' '.join(self.cmd)}")
        self.proc = sb.spawn(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def remember(self) -> None:
        stats = sb.all_proc_stats()
        self.known |= {(pid, stats[pid].start) for pid in sb.tree_pids(self.pid, stats)}

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self.remember()
        sb.stop_process(self.proc, signal.SIGTERM, 10)
        deadline = time.monotonic() + 5
        for pid, start in sorted(self.known):
            while (st := sb.proc_stat(pid)) is not None and st.start == start and time.monotonic() < deadline:
                time.sleep(0.1)
            st = sb.proc_stat(pid)
            if st is not None and st.start == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.profile, ignore_errors=True)
        self.proc = None


# --------------------------------------------------------------------------- 1. dashboard cost


def sipbench_run(target: str, server_pid: int, rate: int, calls: int, work: Path, label: str) -> dict[str, Any]:
    out = work / f"sipbench-{label}.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "sipbench.py"), "--target", target, "--server-pid", str(server_pid),
        "--conn", "t1", "--rate", str(rate), "--calls", str(calls), "--pause", "0.5",
        "--work-dir", str(work / f"sipbench-{label}"), "--json", str(out),
    ]  # fmt: skip
    log(f"{label}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=calls / rate + 120, check=False)
    if not out.exists():
        raise sb.BenchError(f"sipbench wrote no result (rc {proc.returncode}): {proc.stderr[-2000:]}")
    fixed = json.loads(out.read_text()).get("fixed") or []
    if not fixed:
        raise sb.BenchError(f"sipbench made no fixed run (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return dict(fixed[0])


def measure_load(
    label: str,
    rate: int,
    calls: int,
    sipwire: sb.Sipwire,
    console: Console,
    browser: Browser | None,
    work: Path,
) -> dict[str, Any]:
    console_before = tree_cpu_seconds(console.pid)
    browser_before = tree_cpu_seconds(browser.pid) if browser else 0.0
    started = time.monotonic()
    run = sipbench_run(sipwire.address, sipwire.pid, rate, calls, work, label)
    wall = time.monotonic() - started
    console_cpu = tree_cpu_seconds(console.pid) - console_before
    browser_cpu = tree_cpu_seconds(browser.pid) - browser_before if browser else 0.0
    ok = run.get("successful", 0) or 0
    return {
        "label": label,
        "rate": rate,
        "calls": calls,
        "ok": ok,
        "failed": run.get("failed"),
        "sipp_rc": run.get("sipp_rc"),
        "achieved": run.get("achieved"),
        "p50_ms": (run.get("latency_ms") or {}).get("p50"),
        "p99_ms": (run.get("latency_ms") or {}).get("p99"),
        "transport_cpu_pct": run.get("server_cpu_pct"),
        "transport_us_per_exchange": run.get("us_per_exchange"),
        "sipp_cpu_pct": run.get("sipp_cpu_pct"),
        "others_cpu_pct": run.get("others_cpu_pct"),
        "console_cpu_pct": 100.0 * console_cpu / wall,
        "browser_cpu_pct": 100.0 * browser_cpu / wall,
        "wall_s": wall,
    }


def dashboard_cost(args: argparse.Namespace, sipwire: sb.Sipwire, console: Console, work: Path) -> dict[str, Any]:
    # the browser really polls: the console's CPU over a few quiet seconds, without and with it
    def console_idle_pct(seconds: float = 4.0) -> float:
        before = tree_cpu_seconds(console.pid)
        time.sleep(seconds)
        return 100.0 * (tree_cpu_seconds(console.pid) - before) / seconds

    result: dict[str, Any] = {"console_idle_cpu_pct": {"no dashboard": console_idle_pct()}, "runs": []}
    for rate, seconds in ((args.high_rate, args.seconds), (args.low_rate, args.seconds)):
        calls = rate * seconds
        result["runs"].append(measure_load(f"none-{rate}", rate, calls, sipwire, console, None, work))
        browser = Browser(work, f"{console.url}/")
        try:
            browser.start()
            time.sleep(args.browser_warmup)
            browser.remember()
            if "dashboard" not in result["console_idle_cpu_pct"]:
                result["console_idle_cpu_pct"]["dashboard"] = console_idle_pct()
            if browser.proc is None or browser.proc.poll() is not None:
                raise sb.BenchError("chromium exited early")
            result["runs"].append(measure_load(f"dashboard-{rate}", rate, calls, sipwire, console, browser, work))
        finally:
            browser.stop()
    return result


# --------------------------------------------------------------------------- 2. latency with 10k connections


def open_connections(port: int, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    failures = 0
    while len(socks) + failures < n:
        done, failed = sb._connect_batch(sb.LOOPBACK, port, min(500, n - len(socks) - failures), 10.0)
        socks += done
        failures += failed
        if failed and not done:
            break
    if failures:
        log(f"{failures} of {n} connects failed")
    return socks


def request_latency(client: httpx.Client, path: str, count: int, headers: dict[str, str] | None = None) -> dict:
    for _ in range(3):  # warm-up
        client.get(path, headers=headers).raise_for_status()
    samples = []
    size = 0
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(path, headers=headers)
        samples.append((time.perf_counter() - started) * 1000.0)
        response.raise_for_status()
        size = len(response.content)
    return percentiles(samples) | {"bytes": size}


class QuickAckClient:
    """Keep-alive HTTP/1.1 GETs on one raw socket that ACKs at once (TCP_QUICKACK before every recv).

    The console answers a request in two TCP segments (headers, then body) from a socket without
    TCP_NODELAY, so with an ordinary client (delayed ACK, 40 ms on Linux) the body waits for the
    ACK of the headers: about 40 ms on every keep-alive request. This client takes that out, so the
    difference between its figures and httpx's is that artefact, and its own figures are the
    console's work.
    """

    def __init__(self, url: str) -> None:
        host, _, port = url.split("//", 1)[1].rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _recv(self) -> bytes:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        data = self.sock.recv(262144)
        if not data:
            raise sb.BenchError("the console closed the connection")
        return data

    def get(self, path: str, headers: dict[str, str] | None = None) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._recv()
        head, _, body = buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if match is None:
            raise sb.BenchError(f"no Content-Length in the answer to {path}")
        while len(body) < int(match.group(1)):
            body += self._recv()
        if status != 200:
            raise sb.BenchError(f"GET {path}: {status}")
        return body

    def close(self) -> None:
        self.sock.close()


def quickack_latency(url: str, path: str, count: int, headers: dict[str, str] | None = None) -> dict:
    client = QuickAckClient(url)
    try:
        for _ in range(3):
            client.get(path, headers)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            client.get(path, headers)
            samples.append((time.perf_counter() - started) * 1000.0)
        return percentiles(samples)
    finally:
        client.close()


# --------------------------------------------------------------------------- 3. how fast the overview follows


def overview_figures(client: httpx.Client) -> tuple[int, int]:
    """(connections, I/O threads) as the overview's live fragment shows them."""
    text = client.get("/api/stats", headers=HTMX).text
    conns, threads = CONNECTIONS_FIGURE.search(text), THREADS_FIGURE.search(text)
    return (int(conns.group(1)) if conns else -1, int(threads.group(1)) if threads else -1)


def wait_shown(client: httpx.Client, done: Callable[[tuple[int, int]], bool], timeout: float) -> float | None:
    """Monotonic time at which the fragment first satisfied ``done`` (None on timeout); polls every 20 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        figures = overview_figures(client)
        if done(figures):
            return time.monotonic()
        time.sleep(0.02)
    return None


def reflect_connections(client: httpx.Client, port: int, n: int, held: list[socket.socket], timeout: float) -> dict:
    base = overview_figures(client)[0]
    started = time.monotonic()
    new = open_connections(port, n)
    opened = time.monotonic()
    held += new
    shown = wait_shown(client, lambda f: f[0] >= base + len(new), timeout)
    return {
        "change": f"+{len(new)} connections ({base} -> {base + len(new)})",
        "open_s": opened - started,
        "delay_s": None if shown is None else shown - opened,
        "delay_from_start_s": None if shown is None else shown - started,
    }


def reflect_resize(client: httpx.Client, sipwire: sb.Sipwire, size: int, timeout: float) -> dict:
    before = overview_figures(client)[1]
    cmd = [
        sys.executable, "-m", "sipwire.cli", "ctl", "--instance", sipwire.instance, "--state-dir",
        str(sipwire.state_dir), "threads", str(size),
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=sipwire.env, check=False)
    answered = time.monotonic()
    if proc.returncode != 0:
        return {"change": f"threads {before} -> {size}", "error": proc.stderr.strip()[-300:]}
    shown = wait_shown(client, lambda f: f[1] == size, timeout)
    return {
        "change": f"threads {before} -> {size}",
        "ctl_s": answered - started,
        "delay_s": None if shown is None else shown - answered,
        "delay_from_start_s": None if shown is None else shown - started,
    }


def reflect_round(
    client: httpx.Client, sipwire: sb.Sipwire, port: int, n: int, held: list[socket.socket], timeout: float
) -> list[dict[str, Any]]:
    rows = [reflect_connections(client, port, n, held, timeout)]
    time.sleep(1.0)
    for size in (3, 1):
        rows.append(reflect_resize(client, sipwire, size, timeout))
        time.sleep(1.0)
    return rows


# --------------------------------------------------------------------------- report


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_rows(title: str, heads: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    machine = report["machine"]
    print("\n=== consolebench ===")
    print(f"command: {report['command']}")
    print(
        f"date {report['date']}; {machine['nproc']} CPUs; load average at start {machine['load_start']}, "
        f"at end {machine.get('load_end', '-')}; transport --threads {args.threads} --workers {args.workers}"
    )
    if machine["busy"]:
        print("NOTE: the machine was not idle (load average > 0.5 at start or end): the figures are indicative.")
    cost = report.get("dashboard")
    if cost:
        rows = [
            [
                r["label"], str(r["rate"]), f"{r['ok']}/{r['calls']}", fmt(r["achieved"]), fmt(r["p50_ms"], 2),
                fmt(r["p99_ms"], 2), fmt(r["transport_cpu_pct"]), fmt(r["transport_us_per_exchange"]),
                fmt(r["console_cpu_pct"]), fmt(r["browser_cpu_pct"]), fmt(r["sipp_cpu_pct"]),
                fmt(r["others_cpu_pct"], 0),
            ]
            for r in cost["runs"]
        ]  # fmt: skip
        heads = ["run", "rate/s", "ok/calls", "achieved/s", "p50 ms", "p99 ms", "transport CPU%", "us/exch",
                 "console CPU%", "chromium CPU%", "sipp CPU%", "others%"]  # fmt: skip
        print_rows("1. open dashboard (sipbench t1, fixed rates; CPU in % of one core)", heads, rows)
        idle = cost["console_idle_cpu_pct"]
        print(
            f"console CPU with no load: {fmt(idle.get('no dashboard'), 2)} % without a dashboard, "
            f"{fmt(idle.get('dashboard'), 2)} % with one open overview (its polling)"
        )
        for comparison in cost["comparison"]:
            print(
                f"rate {comparison['rate']}/s: achieved with dashboard / without = {comparison['achieved_ratio']:.3f} "
                f"(cost {comparison['throughput_cost_pct']:+.1f} % of the rate), transport us/exch "
                f"{comparison['us_ratio']:.3f}x, p99 {fmt(comparison['p99_none'], 2)} -> "
                f"{fmt(comparison['p99_dashboard'], 2)} ms"
            )
        print(
            "target: an open dashboard costs <= 5 % of the highest sustained rate (here a fixed-rate comparison at "
            f"{args.high_rate}/s, not a full ramp: where the achieved rate keeps up with the target the transport "
            "is not saturated, and the change in transport us/exch plus the console's extra CPU is the cost estimate)"
        )
    lat = report.get("latency")
    if lat:
        rows = [
            [name, str(v["n"]), fmt(v["p50"], 2), fmt(v["p99"], 2), fmt(v["max"], 2), str(v["bytes"]),
             "PASS" if v["p99"] <= 100 else "FAIL", fmt(v["quickack_p50"], 2), fmt(v["quickack_p99"], 2),
             fmt(v["quickack_max"], 2), "PASS" if v["quickack_p99"] <= 100 else "FAIL"]
            for name, v in lat["requests"].items()
        ]  # fmt: skip
        print_rows(
            f"2. console latency with {lat['open_connections']} open idle TCP connections (sequential, keep-alive)",
            ["request", "n", "p50 ms", "p99 ms", "max ms", "bytes", "p99<=100ms", "qa p50", "qa p99", "qa max",
             "qa<=100ms"],
            rows,
        )  # fmt: skip
        print(
            "  p50/p99/max: httpx keep-alive (what an ordinary client sees); qa: a raw keep-alive client with "
            "TCP_QUICKACK, i.e. without the ~40 ms delayed-ACK wait that the console's two-segment answers "
            "(no TCP_NODELAY) cause"
        )
    reflect = report.get("reflect")
    if reflect:
        rows = [
            [r["when"], r["change"], fmt(r.get("open_s") or r.get("ctl_s"), 3), fmt(r.get("delay_s"), 3),
             fmt(r.get("delay_from_start_s"), 3), fmt(None if r.get("delay_s") is None else r["delay_s"] + 1.0, 3),
             "PASS" if r.get("delay_s") is not None and r["delay_s"] <= 2.0 else "FAIL",
             "PASS" if r.get("delay_s") is not None and r["delay_s"] + 1.0 <= 2.0 else "FAIL"]
            for r in reflect
        ]  # fmt: skip
        print_rows(
            "3. overview follows a change (GET /api/stats as htmx, polled every 20 ms)",
            ["with", "change", "action s", "shown after s", "from start s", "+1 s page poll", "<=2s", "worst <=2s"],
            rows,
        )
        print(
            "  action s: opening the connections / `sipwire ctl threads N` until it answered; shown after: from then "
            "until the fragment shows it; the page polls every 1 s, so an operator sees it at most 1 s later "
            "(the worst case is the +1 s column; both are judged against the 2 s target)"
        )


def comparisons(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by_label = {r["label"]: r for r in runs}
    for r in runs:
        if not r["label"].startswith("none-"):
            continue
        dash = by_label.get(f"dashboard-{r['rate']}")
        if dash is None or not r["achieved"] or not r["transport_us_per_exchange"]:
            continue
        ratio = (dash["achieved"] or 0.0) / r["achieved"]
        out.append(
            {
                "rate": r["rate"],
                "achieved_ratio": ratio,
                "throughput_cost_pct": 100.0 * (1.0 - ratio),
                "us_ratio": (dash["transport_us_per_exchange"] or 0.0) / r["transport_us_per_exchange"],
                "p99_none": r["p99_ms"],
                "p99_dashboard": dash["p99_ms"],
            }
        )
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="consolebench",
        description="The ops console's own cost, latency at 10,000 connections and freshness; loopback only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=1, help="transport I/O threads")
    parser.add_argument("--workers", type=int, default=2, help="transport worker processes")
    parser.add_argument("--high-rate", type=int, default=12000, help="step 1: the high fixed rate (exchanges/s)")
    parser.add_argument("--low-rate", type=int, default=500, help="step 1: the latency rate")
    parser.add_argument("--seconds", type=int, default=10, help="step 1: seconds per sipp run")
    parser.add_argument("--browser-warmup", type=float, default=3.0, help="seconds between chromium start and load")
    parser.add_argument("--idle", type=int, default=10000, help="step 2: open idle TCP connections")
    parser.add_argument("--requests", type=int, default=200, help="step 2: requests per endpoint")
    parser.add_argument("--new", type=int, default=1000, help="step 3: new connections opened at once")
    parser.add_argument("--reflect-timeout", type=float, default=15.0, help="step 3: give up after this many s")
    parser.add_argument("--skip-load", action="store_true", help="skip step 1 (no sipp, no chromium)")
    parser.add_argument("--work-dir", type=Path, help="logs and sipbench files (default: a new temp directory)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, sb._on_sigterm)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="consolebench-"))
    work.mkdir(parents=True, exist_ok=True)
    soft = sb.raise_nofile(args.idle + args.new * 2 + 2000)
    if soft < args.idle + args.new * 2 + 500:
        log(f"RLIMIT_NOFILE is only {soft}: fewer connections will open")
    load = os.getloadavg()
    report: dict[str, Any] = {
        "command": " ".join(["python3", "bench/consolebench.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": {"nproc": os.cpu_count(), "load_start": " ".join(f"{x:.2f}" for x in load), "busy": load[0] > 0.5},
    }
    log(f"work dir {work}; {os.cpu_count()} CPUs, load average {report['machine']['load_start']}")
    if not args.skip_load and not CHROMIUM.exists():
        log("no /usr/bin/chromium (apt-get install chromium): use --skip-load")
        return 2
    max_conns = max(12000, args.idle + args.new * 2 + 500)
    env = {"SIPWIRE_MAX_CONNECTIONS": str(max_conns), "SIPWIRE_IDLE_TIMEOUT": "3600", "SIPWIRE_TLS": ""}
    sipwire = sb.Sipwire(work, args.threads, args.workers, env, [])
    console = Console(work, sipwire.instance, sipwire.state_dir)
    held: list[socket.socket] = []
    rc = 0
    try:
        sipwire.start()
        console.start()
        port = int(sipwire.address.rpartition(":")[2])
        if not args.skip_load:
            cost = dashboard_cost(args, sipwire, console, work)
            cost["comparison"] = comparisons(cost["runs"])
            report["dashboard"] = cost
        with httpx.Client(base_url=console.url, timeout=10.0) as client:
            reflect = [r | {"when": "few connections"} for r in reflect_round(client, sipwire, port, args.new, held,
                                                                             args.reflect_timeout)]  # fmt: skip
            for sock in held:
                sock.close()
            held.clear()
            time.sleep(1.0)
            log(f"opening {args.idle} idle connections")
            base = overview_figures(client)[0]
            started = time.monotonic()
            held += open_connections(port, args.idle)
            opened = time.monotonic()
            shown = wait_shown(client, lambda f: f[0] >= base + len(held), 30.0)
            reflect.append(
                {
                    "when": "0 -> idle",
                    "change": f"+{len(held)} connections",
                    "open_s": opened - started,
                    "delay_s": None if shown is None else shown - opened,
                    "delay_from_start_s": None if shown is None else shown - started,
                }
            )
            in_use = overview_figures(client)[0]
            log(f"{len(held)} connections held, the overview shows {in_use}")
            time.sleep(2.0)
            requests = {
                "GET /api/connections?limit=100 (JSON)": ("/api/connections?limit=100", None),
                "GET /connections (page, HTML)": ("/connections", None),
                "GET /api/connections (htmx fragment)": ("/api/connections?limit=50", HTMX),
                "GET /api/stats (overview fragment)": ("/api/stats", HTMX),
                "GET /api/health (JSON, baseline)": ("/api/health", None),
            }
            report["latency"] = {"open_connections": in_use, "requests": {}}
            for name, (path, headers) in requests.items():
                log(f"{args.requests} x {name}")
                figures = request_latency(client, path, args.requests, headers)
                quick = quickack_latency(console.url, path, args.requests, headers)
                figures |= {"quickack_p50": quick["p50"], "quickack_p99": quick["p99"], "quickack_max": quick["max"]}
                report["latency"]["requests"][name] = figures
            more = min(args.new, max(0, max_conns - len(held) - 100))
            when = f"{len(held)} connections"
            reflect += [
                r | {"when": when} for r in reflect_round(client, sipwire, port, more, held, args.reflect_timeout)
            ]
            report["reflect"] = reflect
    except sb.BenchError as error:
        log(f"ERROR: {error}")
        rc = 1
    except KeyboardInterrupt as stop:
        log(f"interrupted ({stop}): cleaning up")
        rc = 130
    finally:
        for sock in held:
            sock.close()
        console.stop()
        sipwire.stop()
        load = os.getloadavg()
        report["machine"]["load_end"] = " ".join(f"{x:.2f}" for x in load)
        report["machine"]["busy"] = report["machine"]["busy"] or load[0] > 0.5
        print_report(report, args)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
            log(f"results written to {args.json}")
        log(f"logs in {work}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
