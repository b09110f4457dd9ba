#!/usr/bin/env python3
"""soak: sipwire under a long, moderate, disturbed load; does anything grow or get lost?

Issue "Fit for the internet edge": run the transport for a long time at a moderate rate with
connection churn, keep-alive pings, pool resizes and a worker kill every few minutes; its RSS and
file-descriptor count must stay flat and nothing may be lost except the messages the transport
counts as lost on the workers that were killed. The CI version is 60 seconds long
(tests/test_soak.py)::

    python3 bench/soak.py --duration 1800 --json /tmp/soak-1800.json
    python3 bench/soak.py --duration 60

It starts its own ``sipwire transport`` (TCP and TLS on free 127.0.0.1 ports, its own instance
name and state directory in the work dir, 2 I/O threads, 2 workers, responder router) and drives,
all at once, all on 127.0.0.1 and all bounded in count and time:

* sipp (a peer nobody here wrote) sending OPTIONS (bench/scenarios/options_uac.xml) over one
  long-lived TCP connection (``-t t1``) and over a new connection per exchange (``-t tn``),
  ``--rate`` exchanges/s each;
* RFC 5626 keep-alives: a few TCP connections send CRLFCRLF every second; each must get its CRLF;
* TLS churn: a few Python ssl clients connect, send one OPTIONS, read the 200 and close, again
  and again (a full handshake each time; the development certificate is not verified);
* every ``min(120 s, duration / 4)`` a resize cycle (``sipwire ctl threads`` 4, 1, then back to 2)
  followed by a ``kill -9`` of one worker (pid from ``sipwire ctl stats --json``) and a wait for
  its restart.

The transport's VmRSS and open fds are sampled every second. The verdict (exit 0 PASS, 1 FAIL)
compares their medians over a short window at ``min(60 s, 25 % of the run)`` and at the end of
the load (< 5 % growth each), and accounts for every failed exchange: each one must fall in a
window right after a worker kill, and there may be no more of them than the transport's
``lost_messages`` counter, which in turn must consist only of messages in flight on killed
workers. bench/README.md and docs/BENCHMARKS.md ("Soak") say more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from sipbench import (
    LOOPBACK,
    SCENARIO,
    BenchError,
    Sipwire,
    free_port,
    parse_stat_file,
    raise_nofile,
    spawn,
    stop_process,
)

# --------------------------------------------------------------------------- bounds and settings

#: Exchanges/s of each sipp stream (t1 and tn) by default: moderate on a shared 2-vCPU box (far below
#: the thousands/s one I/O thread sustains, docs/BENCHMARKS.md) and low enough that the tn stream's
#: client TIME_WAIT sockets (60 s each, so ~6000 at 100/s) stay well below the 28k ephemeral ports
#: without touching net.ipv4.tcp_max_tw_buckets.
DEFAULT_RATE: Final = 100
#: The shortest run that still has a baseline, two kill cycles and a quiet tail (Plan.for_duration).
MIN_DURATION_S: Final = 40.0
#: The transport's pool at start; a resize cycle goes through RESIZE_CYCLE and back to it.
START_THREADS: Final = 2
WORKERS: Final = 2
#: Pool sizes of one resize cycle: grow (new threads take connections), shrink to one (every
#: connection moves, threads retire), then back to START_THREADS.
RESIZE_CYCLE: Final = (4, 1, START_THREADS)
#: Seconds between two resizes of a cycle: enough for connections to move and threads to retire.
RESIZE_STEP_S: Final = 2.0
#: Long runs disturb every 2 minutes; short ones RUN_FRACTION_CYCLES times over the run.
CYCLE_PERIOD_MAX_S: Final = 120.0
RUN_FRACTION_CYCLES: Final = 4
#: The baseline is taken "after the first minute", or at 25 % of a shorter run.
BASELINE_AT_MAX_S: Final = 60.0
BASELINE_FRACTION: Final = 0.25
#: No disturbance in the last min(60 s, one period): the end window measures a settled transport
#: and late failures of the last kill still land inside the run.
QUIET_TAIL_MAX_S: Final = 60.0
#: RSS and fd figures are medians of the 1-s samples over this many seconds: churning connections
#: move the fd count by a few from one second to the next.
FIGURE_WINDOW_S: Final = 5.0
SAMPLE_INTERVAL_S: Final = 1.0
#: The call-flow capture ring: small enough to be full (and evicting) well before the baseline, at
#: 100/s per sipp in a few seconds, so RSS growth after it means a leak, not the ring filling up; the
#: default 8 MiB would still be filling at the baseline of a short run.
CAPTURE_BYTES: Final = 512 * 1024
#: PASS needs less growth than this, for RSS and for fds, baseline to end.
GROWTH_LIMIT_PCT: Final = 5.0
#: An exchange (sipp -recv_timeout, the TLS client's deadline) or ping fails when its answer is
#: this late; a message lost on a killed worker therefore fails this long after the kill.
ANSWER_TIMEOUT_S: Final = 5.0
#: A failure is blamed on a kill if it shows up between the kill and ANSWER_TIMEOUT_S plus this
#: after the worker's restart: sipp's statistics rows are 1 s apart, and a shared machine delays
#: timers by a second or so.
KILL_WINDOW_MARGIN_S: Final = 3.0
#: A killed worker must be running again within this (the pool restarts it at once, or after 1 s
#: if it died young).
RESTART_WAIT_S: Final = 15.0
#: Failed exchanges allowed beyond lost_messages. Zero: every exchange sends exactly one request to
#: a worker; a worker queues its reply's write record before the message's "done" record on the same
#: channel (transport/worker.py), and the I/O thread counts every message of a dead worker that has
#: no "done" yet as lost (a reply already sent but not yet "done" is counted too, which can only
#: make lost_messages larger). Pings never reach a worker. So a kill cannot fail an exchange
#: without counting it; any excess is an accounting hole worth a FAIL.
LOSS_SLACK: Final = 0
#: RFC 5626 keep-alive connections, and one ping on each per interval.
PING_CONNECTIONS: Final = 4
PING_INTERVAL_S: Final = 1.0
#: TLS churn: this many client threads, each starting one exchange per interval (3/s in all).
TLS_CLIENTS: Final = 3
TLS_INTERVAL_S: Final = 1.0
#: sipp's own global -timeout is the run plus this: it ends the run if the transport stalls.
SIPP_TIMEOUT_MARGIN_S: Final = 30.0
#: sipp is killed if it outlives its own -timeout by this.
SIPP_KILL_MARGIN_S: Final = 15.0
#: sipp keeps at most this many sockets (tn: connections in progress); below `ulimit -n` or it refuses.
SIPP_MAX_SOCKET: Final = 1024
#: After the load stops: time for the last answers and closes before the final figures.
DRAIN_S: Final = 3.0
#: Python clients are joined within this after their deadline (each blocking call is bounded).
JOIN_TIMEOUT_S: Final = 2 * ANSWER_TIMEOUT_S
#: sipp's -trace_stat rows are this far apart (-fd).
SIPP_STAT_PERIOD_S: Final = 1

PING: Final = b"\r\n\r\n"
PONG: Final = b"\r\n"
LOST_LINE: Final = re.compile(r"worker \d+: (.+?) with (\d+) in-flight messages from I/O thread \d+: counted as lost")


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """When things happen, in seconds after the load starts."""

    duration: float
    baseline_at: float
    period: float
    cycles: tuple[float, ...]

    @classmethod
    def for_duration(cls, duration: float) -> Plan:
        """Baseline at min(60 s, 25 %); cycles every min(120 s, duration/4) from half a period after it."""
        baseline_at = min(BASELINE_AT_MAX_S, BASELINE_FRACTION * duration)
        period = min(CYCLE_PERIOD_MAX_S, duration / RUN_FRACTION_CYCLES)
        quiet_tail = min(QUIET_TAIL_MAX_S, period)
        cycles = []
        at = baseline_at + period / 2
        while at + quiet_tail <= duration:
            cycles.append(at)
            at += period
        return cls(duration, baseline_at, period, tuple(cycles))


# --------------------------------------------------------------------------- SIP messages


def options_request(transport: str, local: tuple[str, int], target: str, tag: str) -> bytes:
    """One OPTIONS for the responder router; `tag` makes its Call-ID, branch and From tag unique."""
    host, port = local
    lines = [
        f"OPTIONS sip:soak@{target} SIP/2.0",
        f"Via: SIP/2.0/{transport} {host}:{port};branch=z9hG4bK-{tag};rport",
        "Max-Forwards: 70",
        f"From: <sip:soak@{host}:{port}>;tag={tag}",
        f"To: <sip:soak@{target}>",
        f"Call-ID: {tag}@soak",
        "CSeq: 1 OPTIONS",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_status(sock: socket.socket, deadline: float) -> int:
    """Read one whole SIP response (headers and Content-Length body) by `deadline`; its status code."""
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        buffer += recv_some(sock, deadline)
    head = bytes(buffer[:end]).decode("latin-1")
    status_line, *header_lines = head.split("\r\n")
    length = 0
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() in ("content-length", "l"):
            length = int(value)
    while len(buffer) < end + 4 + length:
        buffer += recv_some(sock, deadline)
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[0] != "SIP/2.0" or not parts[1].isdigit():
        raise ValueError(f"not a SIP response: {status_line!r}")
    return int(parts[1])


def recv_some(sock: socket.socket, deadline: float) -> bytes:
    """One recv bounded by `deadline`; EOF is an error (the answer never came)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("no answer in time")
    sock.settimeout(remaining)
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("closed by the transport")
    return data


# --------------------------------------------------------------------------- /proc sampling


@dataclass(frozen=True)
class Sample:
    """The transport process at one moment."""

    at: float  # epoch seconds
    rss_kib: int
    fds: int
    threads: int


def sample_process(pid: int) -> Sample | None:
    """The transport's VmRSS, open fds (len of /proc/PID/fd) and OS threads; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie has no memory left
        return None
    return Sample(time.time(), int(fields["VmRSS"].split()[0]), fds, int(fields["Threads"]))


class Sampler(threading.Thread):
    """Samples the transport once a second until stopped; notes when it is gone."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pid = pid
        self.samples: list[Sample] = []
        self.gone_at: float | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            sample = sample_process(self.pid)
            if sample is None:
                self.gone_at = time.time()
                return
            self.samples.append(sample)
            if self._stop_event.wait(SAMPLE_INTERVAL_S):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def window_median(samples: Iterable[Sample], start: float, end: float, value: Callable[[Sample], int]) -> float:
    """Median of `value` over the samples taken in [start, end] (epoch); NaN if there are none."""
    values = [value(s) for s in samples if start <= s.at <= end]
    return statistics.median(values) if values else math.nan


def growth_pct(base: float, end: float) -> float:
    return 100.0 * (end - base) / base if base else math.nan


# --------------------------------------------------------------------------- Python clients


class Tally:
    """Counts of one client kind, shared by its threads: successes and each failure (epoch, reason)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done = 0
        self.failures: list[tuple[float, str]] = []

    def ok(self) -> None:
        with self._lock:
            self.done += 1

    def fail(self, reason: str) -> None:
        with self._lock:
            self.failures.append((time.time(), reason))

    def as_dict(self) -> dict[str, Any]:
        kinds = Counter(reason for _, reason in self.failures)
        return {"done": self.done, "failed": len(self.failures), "failure_kinds": dict(kinds)}


class PingClients(threading.Thread):
    """RFC 5626 keep-alives: PING_CONNECTIONS connections send CRLFCRLF each second, each expects one CRLF.

    A ping without its pong within ANSWER_TIMEOUT_S (or a connection the transport closed) is a
    failure; that connection is then replaced, so a late pong cannot be taken for the next one.
    Pings are answered by the I/O thread itself and never reach a worker: none may fail, kill or not.
    """

    def __init__(self, address: tuple[str, int], until: float) -> None:
        super().__init__(name="soak-pings", daemon=True)
        self.address = address
        self.until = until  # epoch: no ping is started after it
        self.tally = Tally()
        self.sent = 0

    def _connect(self) -> socket.socket | None:
        """A new keep-alive connection, or None (a failure, retried at the next interval)."""
        try:
            sock = socket.create_connection(self.address, timeout=ANSWER_TIMEOUT_S)
        except OSError as error:
            self.tally.fail(f"connect: {type(error).__name__}")
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def run(self) -> None:
        conns: list[socket.socket | None] = [None] * PING_CONNECTIONS
        try:
            next_at = time.monotonic()
            while time.time() < self.until:
                for index, sock in enumerate(conns):
                    fresh = sock if sock is not None else self._connect()
                    conns[index] = self._ping(fresh) if fresh is not None else None
                next_at += PING_INTERVAL_S
                time.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            for sock in conns:
                if sock is not None:
                    sock.close()

    def _ping(self, sock: socket.socket) -> socket.socket | None:
        """One ping-pong; on failure the connection is closed and replaced (None if that fails too)."""
        try:
            sock.sendall(PING)
            self.sent += 1
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            answer = b""
            while len(answer) < len(PONG):
                answer += recv_some(sock, deadline)
            if answer != PONG:
                raise ValueError(f"pong expected, got {answer[:40]!r}")
            self.tally.ok()
            return sock
        except (OSError, ValueError) as error:
            self.tally.fail(type(error).__name__)
            sock.close()
            return self._connect()


class TlsChurn:
    """TLS_CLIENTS threads, each opening a new TLS connection per exchange: OPTIONS, read the 200, close.

    Full handshakes (no session reuse), no certificate verification (sipwire's self-signed
    development certificate). An exchange fails on any error or when the 200 is not there
    ANSWER_TIMEOUT_S after the connect started.
    """

    def __init__(self, address: tuple[str, int], until: float) -> None:
        self.address = address
        self.target = f"{address[0]}:{address[1]}"
        self.until = until
        self.tally = Tally()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.threads = [
            threading.Thread(target=self._client, args=(index,), name=f"soak-tls-{index}", daemon=True)
            for index in range(TLS_CLIENTS)
        ]
        self._serial = 0
        self._serial_lock = threading.Lock()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _client(self, index: int) -> None:
        next_at = time.monotonic() + index * TLS_INTERVAL_S / TLS_CLIENTS  # spread the clients out
        while True:
            time.sleep(max(0.0, next_at - time.monotonic()))
            if time.time() >= self.until:
                return
            next_at += TLS_INTERVAL_S
            try:
                self._exchange()
                self.tally.ok()
            except (OSError, ValueError) as error:  # ssl.SSLError and TimeoutError are OSErrors
                self.tally.fail(type(error).__name__)

    def _exchange(self) -> None:
        with self._serial_lock:
            self._serial += 1
            tag = f"tls{os.getpid()}-{self._serial}"
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        with (
            socket.create_connection(self.address, timeout=ANSWER_TIMEOUT_S) as raw,
            self.context.wrap_socket(raw) as tls,
        ):
            tls.sendall(options_request("TLS", tls.getsockname()[:2], self.target, tag))
            status = read_status(tls, deadline)
        if status != 200:
            raise ValueError(f"status {status}")


# --------------------------------------------------------------------------- sipp


@dataclass
class SippOutcome:
    """One sipp stream's own figures: statistics file, message counts file and exit code."""

    conn: str
    rate: int
    calls: int
    workdir: str
    rc: int | None = None
    outgoing: int = 0
    successful: int = 0
    failed: int = 0
    sent: int = 0  # OPTIONS requests sent (-trace_counts)
    answered: int = 0  # 200s received where the scenario expected them
    unexpected: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    # failed calls by statistics row: (previous row, this row, failed calls in between), epoch seconds
    failures: list[tuple[float, float, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class SippStream:
    """One bounded sipp process sending OPTIONS at `rate`/s over t1 or tn for the run's duration.

    Bounded three ways: -m calls (rate x duration), sipp's own -timeout (the run plus a margin,
    an error when reached: -timeout_error) and our kill after that. Started from the main thread:
    PR_SET_PDEATHSIG (set by sipbench.spawn) fires when the *thread* that started the child ends.
    """

    def __init__(self, work: Path, conn: str, target: str, rate: int, duration: float) -> None:
        self.conn = conn
        self.workdir = work / f"sipp-{conn}"
        self.workdir.mkdir(parents=True)
        self.calls = max(1, round(rate * duration))
        self.timeout_s = math.ceil(duration + SIPP_TIMEOUT_MARGIN_S)
        self.outcome = SippOutcome(conn=conn, rate=rate, calls=self.calls, workdir=str(self.workdir))
        nofile = raise_nofile(SIPP_MAX_SOCKET + 1000)
        keys = {"server": target, "via_transport": "TCP", "contact_transport": "tcp"}
        self.cmd = [
            "sipp", target, "-sf", str(SCENARIO), "-t", conn,
            "-i", LOOPBACK, "-p", str(free_port()), "-cp", str(free_port()),  # distinct ports per sipp
            "-r", str(rate), "-rp", "1000", "-m", str(self.calls),
            "-max_socket", str(min(SIPP_MAX_SOCKET, nofile - 200)),
            "-recv_timeout", str(int(ANSWER_TIMEOUT_S * 1000)),
            "-timeout", f"{self.timeout_s}s", "-timeout_error",
            "-nostdin",
            "-trace_stat", "-stf", "stat.csv", "-fd", str(SIPP_STAT_PERIOD_S),
            "-trace_counts", "-trace_screen", "-screen_file", "screen.log",
            "-trace_err", "-error_file", "errors.log", "-max_log_size", "1000000",
            *(item for name, value in keys.items() for item in ("-key", name, value)),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.workdir / "cmd.txt").write_text(" ".join(self.cmd) + "\n")
        with open(self.workdir / "sipp.out", "wb") as out:
            self.proc = spawn(
                self.cmd, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def wait(self) -> SippOutcome:
        """Wait for sipp (killing it if it overruns its own -timeout), then read its files."""
        assert self.proc is not None
        try:
            self.proc.wait(self.timeout_s + SIPP_KILL_MARGIN_S)
        except subprocess.TimeoutExpired:
            self.outcome.notes.append("sipp overran its own -timeout: killed")
        stop_process(self.proc, signal.SIGTERM, 5)
        self.outcome.rc = self.proc.returncode
        self._read_files()
        return self.outcome

    def kill(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 5)

    def _read_files(self) -> None:
        out = self.outcome
        stat = parse_stat_file(self.workdir / "stat.csv")

        def count(column: str) -> int:
            value = stat.get(column + "(C)", "0")
            return int(value) if value.isdigit() else 0

        out.outgoing, out.successful, out.failed = count("OutgoingCall"), count("SuccessfulCall"), count("FailedCall")
        out.failure_kinds = {
            name[len("Failed") : -len("(C)")]: int(value)
            for name, value in stat.items()
            if name.startswith("Failed") and name.endswith("(C)") and name != "FailedCall(C)"
            if value.isdigit() and int(value)
        }
        out.failures = failure_rows(self.workdir / "stat.csv")
        counts = last_counts(self.workdir)
        out.sent = sum(v for k, v in counts.items() if k.endswith("_OPTIONS_Sent"))
        out.answered = sum(v for k, v in counts.items() if k.endswith("_200_Recv"))
        out.unexpected = sum(v for k, v in counts.items() if k.endswith("_Unexp"))
        if out.rc not in (0, 1):
            tail = (self.workdir / "sipp.out").read_bytes()[-400:].decode("latin-1", "replace").strip()
            out.notes.append(f"sipp rc {out.rc}: {tail!r}")
        errors = self.workdir / "errors.log"
        if out.failed and errors.exists():
            out.notes.append(f"errors.log tail: {errors.read_bytes()[-300:].decode('latin-1', 'replace').strip()!r}")


def failure_rows(path: Path) -> list[tuple[float, float, int]]:
    """(previous row time, row time, failed calls) for each -trace_stat row whose FailedCall(C) rose.

    A row's CurrentTime ends with the epoch seconds; a failure counted in a row happened after
    the previous row was written and before this one.
    """
    try:
        lines = [line for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
    except OSError:
        return []
    if len(lines) < 2:
        return []
    head = lines[0].split(";")
    at_col, failed_col = head.index("CurrentTime"), head.index("FailedCall(C)")
    rows: list[tuple[float, float, int]] = []
    previous_at, previous_failed = math.nan, 0
    for line in lines[1:]:
        cells = line.split(";")
        at, failed = float(cells[at_col].split()[-1]), int(cells[failed_col])
        if failed > previous_failed:
            since = at - SIPP_STAT_PERIOD_S if math.isnan(previous_at) else previous_at
            rows.append((since, at, failed - previous_failed))
        previous_at, previous_failed = at, failed
    return rows


def last_counts(workdir: Path) -> dict[str, int]:
    """The last row of sipp's -trace_counts file (<scenario>_<pid>_counts.csv) as {column: value}."""
    for path in workdir.glob("*_counts.csv"):
        stat = parse_stat_file(path)
        return {name: int(value) for name, value in stat.items() if value.isdigit()}
    return {}


# --------------------------------------------------------------------------- disturbances


def ctl(sipwire: Sipwire, *action: str) -> dict[str, Any]:
    """`sipwire ctl ACTION --json`; a failure (exit code, timeout, bad output) comes back as {"error": ...}."""
    try:
        result = sipwire.ctl(*action)
    except (OSError, subprocess.SubprocessError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        return {"error": f"{type(error).__name__}: {error}"}
    return result if isinstance(result, dict) else {"error": f"unexpected answer {result!r}"}


@dataclass
class Event:
    """One step of the disturber (or its failure), for the report's timeline."""

    at: float  # epoch seconds
    kind: str  # resize, kill, restart, error
    detail: str
    ok: bool = True


@dataclass
class Kill:
    """One worker kill and the restart that followed it (None until `ctl stats` shows it)."""

    index: int
    pid: int
    killed_at: float
    restarted_at: float | None = None
    new_pid: int | None = None

    @property
    def window(self) -> tuple[float, float]:
        """Where failures caused by this kill can show up (epoch): see KILL_WINDOW_MARGIN_S."""
        settled = self.restarted_at if self.restarted_at is not None else self.killed_at + RESTART_WAIT_S
        return self.killed_at, settled + ANSWER_TIMEOUT_S + KILL_WINDOW_MARGIN_S


class Disturber(threading.Thread):
    """At each planned time: the resize cycle through `sipwire ctl threads`, then kill -9 of one worker.

    Workers are killed in turn (cycle k kills worker k mod WORKERS), by the pid `ctl stats`
    reports, after checking that the pid is a child of our transport; the thread then waits
    (at most RESTART_WAIT_S) until `ctl stats` shows a new pid alive at that index.
    """

    def __init__(self, sipwire: Sipwire, t0: float, plan: Plan) -> None:
        super().__init__(name="soak-disturber", daemon=True)
        self.sipwire = sipwire
        self.t0 = t0
        self.plan = plan
        self.events: list[Event] = []
        self.kills: list[Kill] = []
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        for number, offset in enumerate(self.plan.cycles):
            if self._stop_event.wait(max(0.0, self.t0 + offset - time.time())):
                return
            if not self._resize_cycle():
                return
            self._kill(number % WORKERS)

    def _resize_cycle(self) -> bool:
        for step, size in enumerate(RESIZE_CYCLE):
            if step and self._stop_event.wait(RESIZE_STEP_S):
                return False
            at = time.time()
            result = ctl(self.sipwire, "threads", str(size))
            ok = result.get("size") == size
            detail = f"threads -> {size}" + ("" if ok else f": {result}")
            self.events.append(Event(at, "resize", detail, ok))
        return not self._stop_event.wait(RESIZE_STEP_S)

    def _kill(self, index: int) -> None:
        workers = ctl(self.sipwire, "stats").get("workers", [])
        worker = next((w for w in workers if w.get("index") == index and w.get("alive")), None)
        if worker is None or not self._is_our_child(int(worker["pid"])):
            self.events.append(Event(time.time(), "error", f"no live worker {index} of ours: {workers}", False))
            return
        kill = Kill(index=index, pid=int(worker["pid"]), killed_at=time.time())
        os.kill(kill.pid, signal.SIGKILL)
        self.kills.append(kill)
        self.events.append(Event(kill.killed_at, "kill", f"worker {index} pid {kill.pid} SIGKILL"))
        deadline = kill.killed_at + RESTART_WAIT_S
        while time.time() < deadline and not self._stop_event.is_set():
            now = ctl(self.sipwire, "stats").get("workers", [])
            new = next((w for w in now if w.get("index") == index), None)
            if new is not None and new.get("alive") and new.get("pid") != kill.pid:
                kill.restarted_at, kill.new_pid = time.time(), int(new["pid"])
                self.events.append(Event(kill.restarted_at, "restart", f"worker {index} pid {kill.new_pid}"))
                log(
                    f"{kill.killed_at - self.t0:.0f}s: resize cycle done, worker {index} pid {kill.pid} killed, "
                    f"back as pid {kill.new_pid} within {kill.restarted_at - kill.killed_at:.1f}s"
                )
                return
        self.events.append(Event(time.time(), "error", f"worker {index} not restarted in {RESTART_WAIT_S:g}s", False))

    def _is_our_child(self, pid: int) -> bool:
        """Only a process whose parent is our transport is killed."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return int(stat[stat.rindex(")") + 2 :].split()[1]) == self.sipwire.pid


# --------------------------------------------------------------------------- the run


@dataclass
class RunData:
    """Everything observed in one soak run, before judging it."""

    plan: Plan
    t0: float = 0.0
    load_end: float = 0.0
    idle_before: Sample | None = None
    idle_after: Sample | None = None
    samples: list[Sample] = field(default_factory=list)
    transport_gone_at: float | None = None
    sipp: list[SippOutcome] = field(default_factory=list)
    pings_sent: int = 0
    pings: Tally = field(default_factory=Tally)
    tls: Tally = field(default_factory=Tally)
    events: list[Event] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)


def run_load(sipwire: Sipwire, work: Path, rate: int, plan: Plan) -> RunData:
    """Start every load and the disturber, wait for the run to end, let it drain, collect the figures."""
    data = RunData(plan=plan)
    sampler = Sampler(sipwire.pid)
    sampler.start()
    time.sleep(SAMPLE_INTERVAL_S)
    data.idle_before = sampler.samples[-1] if sampler.samples else None
    tcp_host, tcp_port = sipwire.address.rsplit(":", 1)
    tls_host, tls_port = sipwire.tls_address.rsplit(":", 1)
    data.t0 = time.time()
    until = data.t0 + plan.duration
    streams = [SippStream(work, conn, sipwire.address, rate, plan.duration) for conn in ("t1", "tn")]
    pings = PingClients((tcp_host, int(tcp_port)), until)
    tls = TlsChurn((tls_host, int(tls_port)), until)
    disturber = Disturber(sipwire, data.t0, plan)
    try:
        for stream in streams:
            stream.start()
        pings.start()
        tls.start()
        disturber.start()
        data.sipp = [stream.wait() for stream in streams]
        pings.join(max(0.0, until - time.time()) + JOIN_TIMEOUT_S)
        tls.join(max(0.0, until - time.time()) + JOIN_TIMEOUT_S)
        data.load_end = time.time()
        time.sleep(DRAIN_S)
    finally:
        disturber.stop()
        for stream in streams:
            stream.kill()
    data.stats = ctl(sipwire, "stats")
    sampler.stop()
    data.samples, data.transport_gone_at = sampler.samples, sampler.gone_at
    data.idle_after = sample_process(sipwire.pid)
    data.pings_sent, data.pings, data.tls = pings.sent, pings.tally, tls.tally
    data.events, data.kills = sorted(disturber.events, key=lambda e: e.at), disturber.kills
    return data


# --------------------------------------------------------------------------- verdict


@dataclass
class Check:
    """One PASS condition and the figures it was decided on."""

    name: str
    ok: bool
    detail: str


@dataclass
class Figures:
    """Derived figures: RSS and fds at the baseline and end windows, failures and their accounting."""

    rss_base: float
    rss_end: float
    rss_max: int
    fds_base: float
    fds_end: float
    fds_max: int
    failed_total: int
    failed_in_kill_windows: int
    failed_elsewhere: list[str]
    lost_messages: int
    lost_on_exited_workers: int
    restarts: int

    @property
    def rss_growth_pct(self) -> float:
        return growth_pct(self.rss_base, self.rss_end)

    @property
    def fds_growth_pct(self) -> float:
        return growth_pct(self.fds_base, self.fds_end)


def in_any_window(start: float, end: float, windows: list[tuple[float, float]]) -> bool:
    """Does the interval [start, end] overlap one of the windows?"""
    return any(start <= w_end and end >= w_start for w_start, w_end in windows)


def locate_failures(data: RunData) -> tuple[int, list[str]]:
    """(failed exchanges inside kill windows, descriptions of those outside any) over sipp and TLS."""
    windows = [kill.window for kill in data.kills]
    inside, outside = 0, []
    for outcome in data.sipp:
        for start, end, count in outcome.failures:
            if in_any_window(start, end, windows):
                inside += count
            else:
                outside.append(f"sipp {outcome.conn}: {count} at {end - data.t0:.0f}s")
    for at, reason in data.tls.failures:
        if in_any_window(at - ANSWER_TIMEOUT_S, at, windows):
            inside += 1
        else:
            outside.append(f"tls: {reason} at {at - data.t0:.0f}s")
    return inside, outside


def lost_on_exited_workers(lines: list[str]) -> int:
    """Messages the transport logged as lost because their worker exited (one line per I/O thread)."""
    return sum(int(m[2]) for line in lines if (m := LOST_LINE.search(line)) and m[1] == "worker exited")


def figures(data: RunData) -> Figures:
    base_at, end_at = data.t0 + data.plan.baseline_at, data.t0 + data.plan.duration
    load = [s for s in data.samples if data.t0 <= s.at <= data.load_end]

    def median(start: float, end: float, value: Callable[[Sample], int]) -> float:
        return window_median(data.samples, start - FIGURE_WINDOW_S, end, value)

    failed_total = sum(o.failed for o in data.sipp) + len(data.tls.failures)
    inside, outside = locate_failures(data)
    workers = data.stats.get("workers", [])
    return Figures(
        rss_base=median(base_at, base_at, lambda s: s.rss_kib),
        rss_end=median(end_at, end_at, lambda s: s.rss_kib),
        rss_max=max((s.rss_kib for s in load), default=0),
        fds_base=median(base_at, base_at, lambda s: s.fds),
        fds_end=median(end_at, end_at, lambda s: s.fds),
        fds_max=max((s.fds for s in load), default=0),
        failed_total=failed_total,
        failed_in_kill_windows=inside,
        failed_elsewhere=outside,
        lost_messages=int(data.stats.get("counters", {}).get("lost_messages", 0)),
        lost_on_exited_workers=lost_on_exited_workers(data.log_lines),
        restarts=sum(int(w.get("restarts", 0)) for w in workers),
    )


def idle_fds_check(data: RunData) -> Check:
    """Sharper than the growth limit (5 % of ~30 fds is one fd): once every client has closed and the
    load has drained, the transport must hold exactly as many fds as before the load. Restarted workers
    and resized pools replace their channels and selectors one for one."""
    before, after = data.idle_before, data.idle_after
    if before is None or after is None:
        return Check("fds back to idle", False, "no idle sample before the load or after the drain")
    return Check(
        "fds back to idle", after.fds <= before.fds, f"{before.fds} before the load, {after.fds} after the drain"
    )


def checks(data: RunData, fig: Figures) -> list[Check]:
    """Every PASS condition, each with the figures it was decided on."""
    result = [
        Check(
            "RSS flat",
            fig.rss_growth_pct < GROWTH_LIMIT_PCT,
            f"{fig.rss_base:.0f} -> {fig.rss_end:.0f} KiB ({fig.rss_growth_pct:+.1f} %, limit {GROWTH_LIMIT_PCT:g} %)",
        ),
        Check(
            "fds flat",
            fig.fds_growth_pct < GROWTH_LIMIT_PCT,
            f"{fig.fds_base:.0f} -> {fig.fds_end:.0f} ({fig.fds_growth_pct:+.1f} %, limit {GROWTH_LIMIT_PCT:g} %)",
        ),
        idle_fds_check(data),
        Check(
            "transport up",
            data.transport_gone_at is None and "error" not in data.stats,
            "alive to the end"
            if data.transport_gone_at is None
            else f"gone at {data.transport_gone_at - data.t0:.0f}s",
        ),
        Check(
            "disturbances done",
            all(e.ok for e in data.events) and len(data.kills) == len(data.plan.cycles) == fig.restarts,
            f"{len(data.plan.cycles)} cycles planned, {len(data.kills)} kills, {fig.restarts} restarts, "
            f"{sum(not e.ok for e in data.events)} failed steps",
        ),
    ]
    for o in data.sipp:
        complete = o.rc in (0, 1) and o.outgoing == o.calls == o.successful + o.failed and o.unexpected == 0
        result.append(
            Check(
                f"sipp {o.conn} complete",
                complete,
                f"rc {o.rc}, {o.outgoing}/{o.calls} calls, {o.successful} ok + {o.failed} failed, "
                f"{o.unexpected} unexpected",
            )
        )
    result += [
        Check(
            "pings answered",
            data.pings_sent > 0 and not data.pings.failures and data.pings.done == data.pings_sent,
            f"{data.pings_sent} sent, {data.pings.done} ponged, {len(data.pings.failures)} failed",
        ),
        Check("TLS churn ran", data.tls.done > 0, f"{data.tls.done} exchanges done"),
        Check(
            "failures only after kills",
            not fig.failed_elsewhere,
            f"{fig.failed_in_kill_windows} inside kill windows; outside: {fig.failed_elsewhere[:10] or 'none'}",
        ),
        Check(
            "failures <= lost",
            fig.failed_total <= fig.lost_messages + LOSS_SLACK,
            f"{fig.failed_total} failed exchanges, lost_messages {fig.lost_messages}, slack {LOSS_SLACK}",
        ),
        Check(
            "lost only on killed workers",
            fig.lost_messages == fig.lost_on_exited_workers and (fig.lost_messages == 0 or bool(data.kills)),
            f"lost_messages {fig.lost_messages}, logged as in flight on exited workers {fig.lost_on_exited_workers}",
        ),
        Check(
            "no traceback in the log",
            not any("Traceback" in line for line in data.log_lines),
            f"{sum('Traceback' in line for line in data.log_lines)} tracebacks",
        ),
    ]
    return result


# --------------------------------------------------------------------------- report


def log_summary(lines: list[str]) -> dict[str, int]:
    """WARNING/ERROR/CRITICAL lines of the transport log, numbers blanked so repeats group together."""
    found: Counter[str] = Counter()
    for line in lines:
        if match := re.search(r" (WARNING|ERROR|CRITICAL) (.*)", line):
            found[re.sub(r"\d+", "N", f"{match[1]} {match[2]}")] += 1
    return dict(found.most_common())


def trend(data: RunData, points: int = 10) -> list[dict[str, float]]:
    """RSS and fds at `points` evenly spaced moments of the load (for a glance at the shape)."""
    out = []
    for i in range(1, points + 1):
        at = data.t0 + data.plan.duration * i / points
        out.append(
            {
                "at_s": round(at - data.t0),
                "rss_kib": window_median(data.samples, at - FIGURE_WINDOW_S, at, lambda s: s.rss_kib),
                "fds": window_median(data.samples, at - FIGURE_WINDOW_S, at, lambda s: s.fds),
            }
        )
    return out


def build_report(data: RunData, fig: Figures, results: list[Check], meta: dict[str, Any]) -> dict[str, Any]:
    t0 = data.t0

    def rel(sample: Sample | None) -> dict[str, Any] | None:
        return None if sample is None else asdict(sample) | {"at_s": round(sample.at - t0, 1)}

    return meta | {
        "verdict": "PASS" if all(c.ok for c in results) else "FAIL",
        "checks": [asdict(c) for c in results],
        "plan": asdict(data.plan),
        "t0": t0,
        "load_s": round(data.load_end - t0, 1),
        "figures": asdict(fig) | {"rss_growth_pct": fig.rss_growth_pct, "fds_growth_pct": fig.fds_growth_pct},
        "idle_before_load": rel(data.idle_before),
        "idle_after_drain": rel(data.idle_after),
        "trend": trend(data),
        "sipp": [asdict(o) for o in data.sipp],
        "pings": data.pings.as_dict() | {"sent": data.pings_sent},
        "tls": data.tls.as_dict(),
        "events": [asdict(e) | {"at_s": round(e.at - t0, 1)} for e in data.events],
        "kills": [asdict(k) | {"window_s": [round(w - t0, 1) for w in k.window]} for k in data.kills],
        "counters": data.stats.get("counters", {}),
        "workers": data.stats.get("workers", []),
        "log_problems": log_summary(data.log_lines),
        "samples": [[round(s.at - t0, 1), s.rss_kib, s.fds, s.threads] for s in data.samples],
        "samples_columns": ["at_s", "rss_kib", "fds", "threads"],
    }


def print_summary(report: dict[str, Any]) -> None:
    fig, plan = report["figures"], report["plan"]
    idle_b, idle_a = report["idle_before_load"] or {}, report["idle_after_drain"] or {}
    base = f"at {plan['baseline_at']:.0f}s"
    print(f"\nsoak {plan['duration']:.0f}s against sipwire pid {report['sipwire']['pid']} ({report['setup']})")
    kills = ", ".join(f"{k['killed_at'] - report['t0']:.0f}s" for k in report["kills"]) or "none"
    print(f"  disturbances: {len(plan['cycles'])} resize cycles 2->4->1->2, worker kills at {kills}")
    print(
        f"  transport RSS KiB: {fig['rss_base']:.0f} {base} -> {fig['rss_end']:.0f} at the end "
        f"({fig['rss_growth_pct']:+.2f} %), max {fig['rss_max']}; idle before load {idle_b.get('rss_kib')}, "
        f"after drain {idle_a.get('rss_kib')}"
    )
    print(
        f"  transport fds:     {fig['fds_base']:.0f} {base} -> {fig['fds_end']:.0f} at the end "
        f"({fig['fds_growth_pct']:+.2f} %), max {fig['fds_max']}; idle before load {idle_b.get('fds')}, "
        f"after drain {idle_a.get('fds')}"
    )
    print(
        "  trend (s: RSS KiB / fds): "
        + ", ".join(f"{p['at_s']}: {p['rss_kib']:.0f}/{p['fds']:.0f}" for p in report["trend"])
    )
    for o in report["sipp"]:
        kinds = f" {o['failure_kinds']}" if o["failure_kinds"] else ""
        print(
            f"  sipp {o['conn']} {o['rate']}/s: {o['sent']} sent, {o['answered']} answered, "
            f"{o['failed']} failed{kinds} (rc {o['rc']})"
        )
        for note in o["notes"]:
            print(f"    note: {note}")
    pings, tls = report["pings"], report["tls"]
    print(
        f"  pings: {pings['sent']} sent, {pings['done']} ponged, {pings['failed']} failed", pings["failure_kinds"] or ""
    )
    print(f"  TLS churn: {tls['done']} exchanges done, {tls['failed']} failed", tls["failure_kinds"] or "")
    print(
        f"  failed exchanges {fig['failed_total']} ({fig['failed_in_kill_windows']} inside kill windows); "
        f"lost_messages {fig['lost_messages']}; kills {len(report['kills'])}; worker restarts {fig['restarts']}"
    )
    if report["log_problems"]:
        print("  transport log warnings/errors (numbers blanked):")
        for line, count in list(report["log_problems"].items())[:12]:
            print(f"    {count:5d} x {line[:150]}")
    print("  checks:")
    for check in report["checks"]:
        print(f"    {'PASS' if check['ok'] else 'FAIL'}  {check['name']}: {check['detail']}")
    print(f"verdict: {report['verdict']}", flush=True)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="soak",
        description="sipwire soak: load with churn, pings, resizes and worker kills; RSS and fds must stay flat "
        "and every failure must be a message lost on a killed worker. Loopback only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=float, required=True, help=f"seconds of load (>= {MIN_DURATION_S:g})")
    p.add_argument("--rate", type=int, default=DEFAULT_RATE, help="OPTIONS/s of each sipp stream (t1 and tn)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure and sample as JSON")
    p.add_argument("--work-dir", type=Path, help="sipp files, sipwire log and state (default: a new temp directory)")
    args = p.parse_args(argv)
    if args.duration < MIN_DURATION_S:
        p.error(f"--duration must be at least {MIN_DURATION_S:g} s (baseline, two kill cycles, a quiet tail)")
    if args.rate <= 0:
        p.error("--rate must be positive")
    return args


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = Plan.for_duration(args.duration)
    load1 = os.getloadavg()[0]
    cycles = ", ".join(f"{c:.0f}" for c in plan.cycles)
    log(f"work dir {work}; {os.cpu_count()} CPUs, load average {load1:.2f}; disturbance cycles at {cycles} s")
    sipwire = Sipwire(work, START_THREADS, WORKERS, {"SIPWIRE_CAPTURE_BYTES": str(CAPTURE_BYTES)}, [], tls=True)
    meta: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "uname": " ".join(os.uname())},
        "setup": f"{START_THREADS} I/O threads, {WORKERS} workers; sipp t1 + tn at {args.rate}/s each, "
        f"{PING_CONNECTIONS} ping connections at 1/s, {TLS_CLIENTS} TLS clients at 1/s",
    }
    try:
        sipwire.start()
        meta["sipwire"] = {"cmd": sipwire.cmd, "pid": sipwire.pid, "tcp": sipwire.address, "tls": sipwire.tls_address}
        data = run_load(sipwire, work, args.rate, plan)
    except BenchError as error:
        log(f"ERROR: {error}")
        return 1
    except KeyboardInterrupt as stop:
        log(f"interrupted ({stop}): cleaning up")
        return 130
    finally:
        leftovers = sipwire.stop()
        meta["sipwire_leftovers"] = leftovers
    data.log_lines = sipwire.log_path.read_text(errors="replace").splitlines()
    meta["machine"]["load_average_end"] = os.getloadavg()
    fig = figures(data)
    results = checks(data, fig)
    results.append(Check("nothing left behind", not leftovers, f"processes killed after stop: {leftovers or 'none'}"))
    report = build_report(data, fig, results, meta)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        log(f"results written to {args.json}")
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
