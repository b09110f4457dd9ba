"""otelbench's under-load check: are the traces the console lists still there, whole, when opened later?

A sipwire transport (``bench/sipbench.py``'s ``Sipwire``) exports every trace
(100 % sampling) to a ``sipwire console`` started here for the same instance;
sipbench drives OPTIONS over one TCP connection. Meanwhile a checker reads
``GET /api/traces`` once a second, as the Traces page does, and opens a sample
of the listed traces ``open_after`` seconds later with
``GET /api/traces/{trace_id}``: held, and whole (a root, every parent present,
and sip.receive, sip.route and sip.write all there)?
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import sipbench

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"console listening on http://(\S+?)/")
SIP_SPANS = frozenset({"sip.receive", "sip.route", "sip.write"})


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, None


def whole(trace: dict[str, Any]) -> bool:
    spans = trace.get("spans") or []
    ids = {span["span_id"] for span in spans}
    rooted = any(not span["parent_id"] for span in spans)
    parents = all(not span["parent_id"] or span["parent_id"] in ids for span in spans)
    return rooted and parents and {span["name"] for span in spans} >= SIP_SPANS


class Checker(threading.Thread):
    """Lists traces once a second; opens a sample of each listing ``open_after`` seconds later."""

    def __init__(self, url: str, open_after: float, sample: int) -> None:
        super().__init__(name="otelbench-checker", daemon=True)
        self.url = url
        self.open_after = open_after
        self.sample = sample
        self.listing = True
        self.due: deque[tuple[float, str, str]] = deque()  # (when, trace id, state when listed)
        self.results: list[dict[str, Any]] = []
        self.listings = 0
        self.list_errors = 0

    def run(self) -> None:
        next_list = time.monotonic()
        while self.listing or self.due:
            now = time.monotonic()
            if self.listing and now >= next_list:
                next_list = now + 1.0
                self._list(now)
            while self.due and self.due[0][0] <= time.monotonic():
                _, trace_id, state = self.due.popleft()
                self._open(trace_id, state)
            time.sleep(0.05)

    def _list(self, now: float) -> None:
        try:
            status, body = get_json(f"{self.url}/api/traces")
        except OSError:
            status, body = 0, None
        if status != 200 or not body:
            self.list_errors += 1
            return
        self.listings += 1
        traces = body["traces"]
        step = max(1, len(traces) // self.sample)
        for summary in traces[::step][: self.sample]:
            self.due.append((now + self.open_after, summary["trace_id"], summary["state"]))

    def _open(self, trace_id: str, listed_state: str) -> None:
        try:
            status, body = get_json(f"{self.url}/api/traces/{trace_id}")
        except OSError:
            status, body = 0, None
        held = status == 200 and body is not None
        self.results.append(
            {
                "trace_id": trace_id,
                "listed_state": listed_state,
                "held": held,
                "whole": held and whole(body),
                "spans": len(body["spans"]) if held else 0,
            }
        )


def start_console(instance: str, state_dir: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    log_path = work / "console.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIPWIRE_ADMIN_TOKEN": secrets.token_urlsafe(24)}
    command = [
        sys.executable, "-m", "sipwire.cli", "console", "--listen", "127.0.0.1:0",
        "--instance", instance, "--state-dir", str(state_dir),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = sipbench.spawn(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=work)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and process.poll() is None:
        match = LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            return process, f"http://{match.group(1)}"
        time.sleep(0.1)
    sipbench.stop_process(process)
    raise sipbench.BenchError(f"the console did not start: {log_path.read_text(errors='replace')[-1500:]}")


def console_figures(url: str) -> dict[str, float]:
    """The console's sipwire_console_* samples from /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10.0) as answer:
        text = answer.read().decode()
    figures = {}
    for line in text.splitlines():
        if line.startswith("sipwire_console_"):
            name, _, value = line.rpartition(" ")
            figures[name] = float(value)
    return figures


def run_under_load(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the check; print and return its figures (``completed`` False when a step failed)."""
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"\n=== under load: {args.load_rate} OPTIONS/s x {args.load_duration:g} s, 100 % sampling, "
        f"{args.load_workers} worker(s); listed traces opened {args.open_after:g} s later",
        flush=True,
    )
    server = sipbench.Sipwire(work, 1, args.load_workers, {}, [])
    console, url = start_console(server.instance, server.state_dir, work)
    server.env = {key: value for key, value in server.env.items() if not key.startswith("OTEL_")}
    server.env |= {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{url}/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    result: dict[str, Any] = {"completed": False}
    try:
        server.start()
        checker = Checker(url, args.open_after, args.sample)
        checker.start()
        calls = round(args.load_rate * args.load_duration)
        command = [
            sys.executable, str(Path(__file__).with_name("sipbench.py")), "--target", server.address,
            "--server-pid", str(server.pid), "--conn", "t1", "--rate", str(args.load_rate), "--calls", str(calls),
            "--work-dir", str(work / "sipbench"), "--json", str(work / "load.json"),
        ]  # fmt: skip
        with open(work / "sipbench.log", "wb") as log_file:
            rc = subprocess.run(
                command, stdout=log_file, stderr=subprocess.STDOUT, timeout=args.load_duration + 180, check=False
            ).returncode
        checker.listing = False
        checker.join(args.open_after + 30.0)
        load = json.loads((work / "load.json").read_text()).get("fixed", [{}])[0] if rc == 0 else {}
        counters = server.ctl("stats").get("counters", {})
        result |= {
            "completed": rc == 0,
            "achieved": load.get("achieved"),
            "failed": load.get("failed"),
            "p99_ms": (load.get("latency_ms") or {}).get("p99"),
            "us_per_exchange": load.get("us_per_exchange"),
            "listings": checker.listings,
            "list_errors": checker.list_errors,
            "opened": len(checker.results),
            "held": sum(r["held"] for r in checker.results),
            "whole": sum(r["whole"] for r in checker.results),
            "telemetry": {k: v for k, v in counters.items() if k.startswith("telemetry.")},
            "console": console_figures(url),
            "not_whole": [r for r in checker.results if not r["whole"]][:10],
        }
    finally:
        server.stop()
        sipbench.stop_process(console)
    print_result(result, args)
    return result


def print_result(result: dict[str, Any], args: argparse.Namespace) -> None:
    if not result.get("completed"):
        print("under-load check did not complete (see the logs in the work dir)")
        return
    opened = result["opened"] or 1
    print(
        f"load: achieved {result['achieved']:.0f}/s, failed {result['failed']}, p99 {result['p99_ms']:.1f} ms, "
        f"{result['us_per_exchange']:.0f} CPU us/exchange (server tree incl. exporter)"
    )
    print(
        f"listed traces opened {args.open_after:g} s later: {result['opened']} from {result['listings']} listings; "
        f"held {result['held']} ({100 * result['held'] / opened:.1f} %), "
        f"whole {result['whole']} ({100 * result['whole'] / opened:.1f} %); target >= 99 %"
    )
    print("transport telemetry counters: " + ", ".join(f"{k[10:]}={v}" for k, v in sorted(result["telemetry"].items())))
    console = result["console"]
    print("console store: " + ", ".join(f"{k[16:]}={v:g}" for k, v in sorted(console.items())))
    for missing in result["not_whole"]:
        print(f"  not whole: {missing}")
