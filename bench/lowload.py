"""Issue 13's latency targets side by side: Kamailio and sipwire variants, alternated in rounds.

Three scenarios, each at ``--rate`` per second, all measured by ``bench/sipbench.py`` (sipp with the
microsecond clock shim, percentiles from sipp's RTT trace, CPU of the server's process tree):

* ``direct``: OPTIONS over one TCP connection, answered by the server (Kamailio's ``options`` mode,
  sipwire's ``responder``);
* ``proxy``: the same through the server to the shared harness's sipp UAS (Kamailio's stateless
  forward, sipwire's ``proxy`` router with ``--open-registrar``), one TCP connection per leg;
* ``tls-tn``: TLS, a new connection and a full handshake per exchange (sipp behind stunnel).

Every round runs every (scenario, server) pair once, in the same order, so a slow minute on this
shared machine hits every column alike; the table gives each pair's median over rounds and the
ratios the issue sets (p99 sipwire / Kamailio). Kamailio comes from the team's harness
(``../shared/bench``: one TCP worker), started and stopped by PID for each scenario.

    .venv/bin/python bench/lowload.py --rounds 3 --calls 5000 \\
        --variant base= --variant poll="--busy-poll-us 300"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("SHARED_BENCH", HERE.parent.parent / "shared" / "bench"))
SCENARIOS = ("direct", "proxy", "tls-tn")
#: sipwire's stage histograms (transport/stages.py): mean and p99 bucket bound of each, per run.
STAGES = ("read_framed_ms", "queue_wait_ms", "routing_ms", "write_latency_ms", "dispatch_latency_ms")
UAS_PORT = 5070


def log(text: str) -> None:
    print(f"[lowload {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def sipbench(work: Path, args: list[str]) -> dict[str, Any]:
    """One sipbench fixed run; its result (latency ms, CPU µs per exchange, failures)."""
    out = work / "result.json"
    command = [sys.executable, str(HERE / "sipbench.py"), "--work-dir", str(work), "--json", str(out), *args]
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    if not out.exists():
        return {"failed": "no result"}
    report = json.loads(out.read_text())
    run = (report.get("fixed") or [{}])[0]
    stats = report.get("sipwire_stats") or {}  # sipwire started by sipbench: its figures at the end of the run
    stages = {
        name: (round(h["sum_ms"] / h["count"], 3), h["p99"])
        for name in STAGES
        if (h := stats.get(name)) and h.get("count")
    }
    return {
        "stages": stages,
        "p50": run.get("latency_ms", {}).get("p50"),
        "p99": run.get("latency_ms", {}).get("p99"),
        "us": run.get("us_per_exchange"),
        "failed": run.get("failed"),
        "busy": run.get("machine_busy_pct"),
    }


def scenario_args(scenario: str, rate: int, calls: int) -> list[str]:
    conn = "tn" if scenario == "tls-tn" else "t1"
    transport = "tls" if scenario == "tls-tn" else "tcp"
    extra = ["--set-tw-buckets"] if conn == "tn" else []
    return ["--transport", transport, "--conn", conn, "--rate", str(rate), "--calls", str(calls), *extra]


class Kamailio:
    """The harness's Kamailio (one TCP worker), in the mode a scenario needs; stopped by PID."""

    def __init__(self, work: Path, cert: tuple[Path, Path]) -> None:
        self.env = {**os.environ, "ANCHOR_WORK": str(work), "TCP_CHILDREN": "1", "CERT_DIR": str(work / "certs")}
        (work / "certs").mkdir(parents=True, exist_ok=True)
        for source, name in zip(cert, ("server.crt", "server.key"), strict=True):
            (work / "certs" / name).write_bytes(source.read_bytes())

    def run(self, scenario: str, work: Path, rate: int, calls: int) -> dict[str, Any]:
        mode = "proxy" if scenario == "proxy" else "options"
        ctl = str(SHARED / "kamailio" / "kamctl.sh")
        pid = subprocess.run([ctl, "start", mode], env=self.env, check=True, capture_output=True, text=True)
        try:
            port = 5061 if scenario == "tls-tn" else 5060
            target = ["--target", f"127.0.0.1:{port}", "--server-pid", pid.stdout.strip()]
            return sipbench(work, [*target, *scenario_args(scenario, rate, calls)])
        finally:
            subprocess.run([ctl, "stop"], env=self.env, check=False, capture_output=True)


def sipwire_run(
    scenario: str, work: Path, rate: int, calls: int, variant: list[str], cert: tuple[Path, Path]
) -> dict[str, Any]:
    started = ["--start-sipwire", "--threads", "1", "--workers", "1", "--cert", str(cert[0]), "--key", str(cert[1])]
    extra = list(variant)
    if scenario == "proxy":
        extra += ["--router", "proxy", "--open-registrar", "--upstream", f"sip:127.0.0.1:{UAS_PORT};transport=tcp"]
    return sipbench(work, [*started, *(f"--sipwire-arg={arg}" for arg in extra), *scenario_args(scenario, rate, calls)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--calls", type=int, default=5000, help="exchanges per run (direct and proxy)")
    parser.add_argument("--tls-calls", type=int, default=3000, help="exchanges per tls-tn run")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=ARGS",
        help="a sipwire variant: its name and extra `sipwire transport` arguments (repeat); default base=",
    )  # fmt: skip
    parser.add_argument("--no-kamailio", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path(f"/tmp/sipwire-lowload-{time.strftime('%Y%m%d-%H%M%S')}"))
    args = parser.parse_args(argv)
    variants = [(name, shlex.split(rest)) for name, _, rest in (v.partition("=") for v in args.variant or ["base="])]
    scenarios = [s for s in args.scenarios.split(",") if s]
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "sipbench.py"), "--work-dir", str(work), "--cert-type", "rsa"],
                   check=True, capture_output=True)  # fmt: skip
    cert = (work / "certs" / "server-rsa.crt", work / "certs" / "server-rsa.key")
    kamailio = None if args.no_kamailio else Kamailio(work / "kamailio", cert)
    uas_script = str(SHARED / "tools" / "uas.sh")
    uas = subprocess.run([uas_script, "start", str(UAS_PORT)], check=True, capture_output=True, text=True)
    log(f"UAS pid {uas.stdout.strip()}; results in {work}")
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    servers = ([("kamailio", None)] if kamailio else []) + [(f"sipwire-{name}", v) for name, v in variants]
    try:
        for round_index in range(args.rounds):
            for scenario in scenarios:
                calls = args.tls_calls if scenario == "tls-tn" else args.calls
                for server, variant in servers:
                    run_dir = work / f"r{round_index}-{scenario}-{server}"
                    if variant is None:
                        assert kamailio is not None
                        result = kamailio.run(scenario, run_dir, args.rate, calls)
                    else:
                        result = sipwire_run(scenario, run_dir, args.rate, calls, variant, cert)
                    results.setdefault((scenario, server), []).append(result)
                    log(f"round {round_index + 1} {scenario:7} {server:18} {result}")
    finally:
        subprocess.run([uas_script, "stop"], check=False, capture_output=True)
    (work / "lowload.json").write_text(json.dumps({f"{s}/{n}": r for (s, n), r in results.items()}, indent=2))
    print_table(results, scenarios, [name for name, _ in servers])
    return 0


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
    return statistics.median(values) if values else None


def print_table(results: dict[tuple[str, str], list[dict[str, Any]]], scenarios: list[str], servers: list[str]) -> None:
    print(f"\nmedian over rounds at the same rate; p99 ratio = sipwire / kamailio ({os.cpu_count()} CPUs)")
    row = "{:8} {:20} {:>4} {:>8} {:>8} {:>8} {:>6} {:>6}"
    print(row.format("scenario", "server", "runs", "p50 ms", "p99 ms", "us/exch", "failed", "ratio"))
    for scenario in scenarios:
        reference = _median(results.get((scenario, "kamailio"), []), "p99")
        for server in servers:
            runs = results.get((scenario, server), [])
            p50, p99, us = (_median(runs, key) for key in ("p50", "p99", "us"))
            failed = sum(int(run.get("failed") or 0) for run in runs if isinstance(run.get("failed"), int))
            ratio = f"{p99 / reference:.2f}" if p99 and reference else "-"
            cells = [f"{v:.3f}" if v is not None else "-" for v in (p50, p99)] + [f"{us:.0f}" if us else "-"]
            print(row.format(scenario, server, len(runs), *cells, failed, ratio))
    print("\nsipwire's stages, last round: mean ms / p99 bucket bound ms (transport/stages.py)")
    for (scenario, server), runs in results.items():
        if runs and runs[-1].get("stages"):
            text = "  ".join(f"{name[:-3]} {mean}/{p99}" for name, (mean, p99) in runs[-1]["stages"].items())
            print(f"{scenario:8} {server:20} {text}")


if __name__ == "__main__":
    sys.exit(main())
