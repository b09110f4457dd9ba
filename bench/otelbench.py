"""otelbench: what tracing costs sipwire, and whether traces hold up under load, in one run.

Cost (default): tracing off and 100 % sampling (and optionally 10 %), alternated
round by round. Each run is ``bench/sipbench.py --start-sipwire`` (a fresh
sipwire, 1 I/O thread, 1 worker) with the mode's ``OTEL_*`` variables, OPTIONS
over one TCP connection at ``--rate`` for ``--duration`` seconds, measured
after one unmeasured run of the same load on that sipwire (its start-up --
worker imports, first connections -- is not what tracing costs); traced modes
export over OTLP/HTTP to a sink run here on 127.0.0.1 (answers 200, counts
spans per service), so the figures include the whole export path. It prints
each run, then the p99 ratio 100 %/off and CPU microseconds per exchange
(medians over the rounds). ``--capacity`` adds sipbench's ramp to every run:
the highest passing rate per mode and the capacity lost to tracing.

Under load (``--under-load``): a sipwire and a ``sipwire console`` (its trace
store) on loopback, the transport exporting to the console, 100 % sampling,
``--load-rate`` OPTIONS/s for ``--load-duration`` s. Every second the trace list
is read (as the Traces page does) and a sample of the listed traces is opened
``--open-after`` seconds later: held, and whole (a root, every parent present,
receive, route and write)? Prints the fractions and every drop counter.

    python3 bench/otelbench.py                                   # 3 rounds, 500/s x 10 s per mode
    python3 bench/otelbench.py --rounds 5 --capacity --rates 2000,4000,6000,8000
    python3 bench/otelbench.py --no-cost --under-load             # 2000/s x 30 s, opened 8 s later

Everything stays on loopback; every run is bounded (sipbench bounds sipp; each
subprocess here has a timeout too). Latency on a shared machine is noisy:
compare the ratios of one run, alternated, and CPU per exchange.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from underload import run_under_load

REPO = Path(__file__).resolve().parent.parent
SIPBENCH = REPO / "bench" / "sipbench.py"
LOOPBACK = "127.0.0.1"

#: mode name -> OTEL_* variables (the sink's endpoint is added for traced modes).
MODES: dict[str, dict[str, str]] = {
    "off": {},
    "100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    "10%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
}


class Sink:
    """An OTLP/HTTP endpoint on loopback that discards what it gets, counting requests, bytes and spans."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.spans: Counter[str] = Counter()
        try:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        except ImportError:  # counting spans is a bonus: requests and bytes are counted anyway
            decode = None
        else:
            decode = ExportTraceServiceRequest.FromString
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                counted: Counter[str] = Counter()
                if decode is not None and self.path.endswith("/v1/traces"):
                    for resource_spans in decode(body).resource_spans:
                        service = next(
                            (
                                a.value.string_value
                                for a in resource_spans.resource.attributes
                                if a.key == "service.name"
                            ),
                            "?",
                        )
                        counted[service] += sum(len(scope.spans) for scope in resource_spans.scope_spans)
                with sink.lock:
                    sink.requests += 1
                    sink.bytes += len(body)
                    sink.spans.update(counted)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def reset(self) -> dict[str, Any]:
        with self.lock:
            counts = {"requests": self.requests, "bytes": self.bytes, "spans": dict(self.spans)}
            self.requests = 0
            self.bytes = 0
            self.spans = Counter()
        return counts

    @contextmanager
    def running(self) -> Iterator[Sink]:
        self.thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class ModeResult:
    mode: str
    rc: int
    achieved: float = 0.0
    successful: int = 0
    failed: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    us_per_exchange: float = float("nan")
    server_cpu_pct: float = float("nan")
    steady_ms: dict[str, float] = field(default_factory=dict)  # latency after the warm-up
    ramp_best: int | None = None
    ramp_first_fail: int | None = None
    sink: dict[str, Any] = field(default_factory=dict)
    log: str = ""


def run_mode(mode: str, args: argparse.Namespace, sink: Sink, work: Path, round_: int = 0) -> ModeResult:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    if MODES[mode]:
        env |= {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            **MODES[mode],
        }
    slug = {"off": "off", "100%": "all", "10%": "tenth"}[mode] + f"-{round_}"
    report = work / f"{slug}.json"
    log_path = work / f"{slug}.log"
    command = [
        sys.executable, str(SIPBENCH), "--start-sipwire",
        "--threads", str(args.threads), "--workers", str(args.workers),
        "--conn", f"{args.conn},{args.conn}" if args.warm else args.conn,
        "--rate", str(args.rate), "--calls", str(args.calls),
        "--work-dir", str(work / slug), "--json", str(report),
    ]  # fmt: skip
    if args.capacity:
        command += ["--ramp", "--ramp-conn", args.conn, "--rates", args.rates, "--step", str(args.step)]
    steps = len(args.rates.split(",")) + 3  # the rising steps, then sipbench's bisection
    budget = (1 + args.warm) * args.calls / args.rate + 120.0 + steps * (args.step + 10) * args.capacity
    print(f"\n=== {mode}: {' '.join(command[1:])}", flush=True)
    sink.reset()
    with open(log_path, "wb") as log_file:
        try:
            rc = subprocess.run(
                command, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=budget, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    time.sleep(1.0)  # the last batches leave sipwire when it stops
    result = ModeResult(mode, rc, sink=sink.reset(), log=str(log_path))
    if not report.exists():
        return result
    data = json.loads(report.read_text())
    fixed = (data.get("fixed") or [{}])[-1]  # with --warm, the second run on the warmed-up sipwire
    result.achieved = float(fixed.get("achieved", 0.0))
    result.successful = int(fixed.get("successful", 0))
    result.failed = int(fixed.get("failed", 0))
    result.latency_ms = {k: float(v) for k, v in (fixed.get("latency_ms") or {}).items()}
    result.us_per_exchange = float(fixed.get("us_per_exchange", float("nan")))
    result.server_cpu_pct = float(fixed.get("server_cpu_pct", float("nan")))
    result.steady_ms = steady_latency(Path(str(fixed.get("rundir", ""))), args.rate * args.warmup)
    ramp = data.get("ramp") or {}
    result.ramp_best = ramp.get("best")
    result.ramp_first_fail = ramp.get("first_fail")
    return result


def steady_latency(rundir: Path, skip: float) -> dict[str, float]:
    """Percentiles of sipp's per-exchange response times after the first ``skip`` exchanges.

    A sipwire just started is still warming up (imports, the exporter processes starting next
    to it); the fixed run's own percentiles include that, these leave it out.
    """
    files = sorted(rundir.glob("*_rtt.csv")) if rundir.is_dir() else []
    if not files:
        return {}
    times: list[float] = []
    with open(files[0]) as rtt:
        next(rtt, None)  # header: Date_ms;response_time_ms;rtd_no
        for index, line in enumerate(rtt):
            if index >= skip:
                fields = line.split(";")
                if len(fields) > 1:
                    times.append(float(fields[1]))
    if not times:
        return {}
    times.sort()

    def at(fraction: float) -> float:
        return times[min(len(times) - 1, int(fraction * len(times)))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": times[-1], "count": float(len(times))}


def print_table(results: list[ModeResult], args: argparse.Namespace) -> None:
    heads = ["tracing", "ok", "failed", "achieved/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "steady p99",
             "steady max", "CPU us/exch", "CPU %", "spans transport", "spans worker", "export reqs"]  # fmt: skip
    if args.capacity:
        heads.append("ramp best/s")
    rows = []
    for r in results:
        lat = r.latency_ms
        row = [
            r.mode,
            str(r.successful),
            str(r.failed),
            f"{r.achieved:.0f}",
            *(f"{lat.get(k, float('nan')):.2f}" for k in ("p50", "p95", "p99", "max")),
            *(f"{r.steady_ms.get(k, float('nan')):.2f}" for k in ("p99", "max")),
            f"{r.us_per_exchange:.0f}",
            f"{r.server_cpu_pct:.0f}",
            str(r.sink.get("spans", {}).get("sipwire-transport", 0)),
            str(r.sink.get("spans", {}).get("sipwire-worker", 0)),
            str(r.sink.get("requests", 0)),
        ]
        if args.capacity:
            fail = f" (fail {r.ramp_first_fail})" if r.ramp_first_fail else ""
            row.append(f"{r.ramp_best}{fail}")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    print(
        f"\nsipwire --threads {args.threads} --workers {args.workers}, {args.conn}, {args.rate} OPTIONS/s x "
        f"{args.calls}; CPU = transport + workers + exporter process, % of one core; steady = after the "
        f"first {args.warmup:g} s (warm-up); spans counted at the OTLP sink"
    )
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    for r in results:
        if r.rc:
            print(f"NOTE: {r.mode}: sipbench exited with {r.rc}; see {r.log}")


def _median(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]  # NaN: a run without that figure
    return statistics.median(clean) if clean else float("nan")


def print_summary(results: list[ModeResult], args: argparse.Namespace) -> dict[str, Any]:
    """Per mode, medians over the rounds; then the ratios the issue's targets are about."""
    print(f"\nmedians over {args.rounds} alternated round(s); load average now {os.getloadavg()[0]:.2f}")
    heads = ["tracing", "achieved/s", "p50 ms", "p99 ms", "steady p99", "CPU us/exch", "CPU %", "ramp best/s"]
    print("  ".join(f"{h:>11}" for h in heads))
    medians: dict[str, dict[str, float]] = {}
    for mode in args.mode_list:
        runs = [r for r in results if r.mode == mode]
        figures = {
            "achieved": _median([r.achieved for r in runs]),
            "p50": _median([r.latency_ms.get("p50", float("nan")) for r in runs]),
            "p99": _median([r.latency_ms.get("p99", float("nan")) for r in runs]),
            "steady_p99": _median([r.steady_ms.get("p99", float("nan")) for r in runs]),
            "us_per_exchange": _median([r.us_per_exchange for r in runs]),
            "cpu_pct": _median([r.server_cpu_pct for r in runs]),
            "ramp_best": _median([float(r.ramp_best) for r in runs if r.ramp_best]),
        }
        medians[mode] = figures
        print("  ".join([f"{mode:>11}", *(f"{v:>11.2f}" for v in figures.values())]))
    summary: dict[str, Any] = {"medians": medians}
    if "off" in medians and "100%" in medians:
        off, full = medians["off"], medians["100%"]
        pairs = [
            (a.latency_ms.get("p99", float("nan")), b.latency_ms.get("p99", float("nan")))
            for a, b in zip(
                [r for r in results if r.mode == "off"], [r for r in results if r.mode == "100%"], strict=False
            )
        ]
        ratios = [b / a for a, b in pairs if a and not math.isnan(a) and not math.isnan(b)]
        summary["p99_ratio"] = full["p99"] / off["p99"]
        summary["steady_p99_ratio"] = full["steady_p99"] / off["steady_p99"]
        summary["cpu_us_added"] = full["us_per_exchange"] - off["us_per_exchange"]
        print(
            f"\np99 100 %/off: {summary['p99_ratio']:.2f}x (medians; per round "
            f"{', '.join(f'{r:.2f}' for r in ratios)}), steady p99 {summary['steady_p99_ratio']:.2f}x; target <= 1.2x"
        )
        print(
            f"CPU per exchange: off {off['us_per_exchange']:.0f} us, 100 % {full['us_per_exchange']:.0f} us "
            f"(+{summary['cpu_us_added']:.0f} us: recording, shipping and exporting 3 spans)"
        )
        if args.capacity and not math.isnan(off["ramp_best"] + full["ramp_best"]):
            summary["capacity_loss"] = 1.0 - full["ramp_best"] / off["ramp_best"]
            top = max(int(rate) for rate in args.rates.split(","))
            bound = " at most (off passed every step: raise --rates)" if off["ramp_best"] >= top else ""
            print(
                f"capacity: off {off['ramp_best']:.0f}/s, 100 % {full['ramp_best']:.0f}/s: "
                f"{100 * summary['capacity_loss']:.1f} % lost{bound} (target <= 15 %)"
            )
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cost = p.add_argument_group("cost: tracing off vs on, alternated")
    cost.add_argument("--no-cost", action="store_true", help="skip the cost runs")
    cost.add_argument(
        "--modes", default="off,100%", help="comma-separated subset of: " + ", ".join(MODES).replace("%", "%%")
    )
    cost.add_argument("--rate", type=int, default=500, help="OPTIONS per second of each run")
    cost.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    cost.add_argument("--rounds", type=int, default=3, help="rounds of all modes, alternated (medians are printed)")
    cost.add_argument("--conn", choices=("t1", "tn"), default="t1", help="one connection, or one per exchange")
    cost.add_argument("--threads", type=int, default=1, help="sipwire I/O threads")
    cost.add_argument("--workers", type=int, default=1, help="sipwire worker processes")
    cost.add_argument("--warmup", type=float, default=1.0, help="seconds left out of the steady percentiles")
    cost.add_argument(
        "--no-warm",
        dest="warm",
        action="store_false",
        help="measure the first run of a fresh sipwire (default: one run of the same load first, not measured)",
    )
    cost.add_argument("--capacity", action="store_true", help="also find each mode's highest passing rate (ramp)")
    cost.add_argument("--rates", default="2000,4000,6000,8000", help="ramp steps")
    cost.add_argument("--step", type=int, default=3, help="seconds per ramp step")
    load = p.add_argument_group("under load: listed traces opened later, at the console")
    load.add_argument("--under-load", action="store_true", help="run the under-load check")
    load.add_argument("--load-rate", type=int, default=2000, help="OPTIONS per second")
    load.add_argument("--load-duration", type=float, default=30.0, help="seconds of load")
    load.add_argument("--open-after", type=float, default=8.0, help="seconds between listing a trace and opening it")
    load.add_argument("--sample", type=int, default=20, help="listed traces opened per listing (one a second)")
    load.add_argument("--load-workers", type=int, default=1, help="sipwire worker processes for the load")
    p.add_argument("--work-dir", type=Path, help="sipbench files and logs (default: a new temp directory)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}: use {', '.join(MODES)}")
    if min(args.rate, args.rounds, args.load_rate) <= 0 or min(args.duration, args.load_duration) <= 0:
        p.error("rates, durations and rounds must be positive")
    args.calls = round(args.rate * args.duration)
    if args.no_cost and not args.under_load:
        p.error("nothing to do: --no-cost without --under-load")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="otelbench-"))
    work.mkdir(parents=True, exist_ok=True)
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True, cwd=REPO, check=False).stdout
    print(f"work dir {work}; commit {commit.strip()}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")
    report: dict[str, Any] = {"commit": commit.strip()}
    ok = True
    if not args.no_cost:
        results: list[ModeResult] = []
        with Sink().running() as sink:
            print(f"OTLP/HTTP sink at {sink.endpoint}", flush=True)
            # Rounds alternate the modes, so a neighbour's load spreads over all of them alike.
            for round_ in range(args.rounds):
                for mode in args.mode_list:
                    results.append(run_mode(mode, args, sink, work, round_ + 1))
                    time.sleep(2.0)
        print_table(results, args)
        report["cost"] = {"runs": [r.__dict__ for r in results], "summary": print_summary(results, args)}
        ok = all(r.rc == 0 for r in results)
    if args.under_load:
        load = run_under_load(args, work / "under-load")
        report["under_load"] = load
        ok = ok and bool(load.get("completed"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
