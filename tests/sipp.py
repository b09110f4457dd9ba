"""Drive the real ``sipp`` binary as a SIP peer, bounded in calls and time.

``Sipp(...)`` starts one sipp process (no ``-bg``, ``-nostdin``) in its own
working directory; ``wait()`` returns a :class:`SippResult` built from the
files sipp writes there: the statistics CSV (``-trace_stat``: successful and
failed calls), the per-message counts CSV (``-trace_counts``: requests sent,
responses received), the final screens (``-trace_screen``) and unexpected
messages (``-trace_err``). Every run is bounded three ways: ``-m`` calls,
sipp's global ``-timeout`` (an error when reached), and a hard
``subprocess`` deadline after which sipp is killed. Each call's response has
to arrive within ``-recv_timeout``, so a lost message fails that call
rather than hanging the run.

Ports: the SIP port (``-p``) and the UDP control port (``-cp``) are free
ports picked by the kernel, so several sipp runs never clash.
"""

from __future__ import annotations

import csv
import re
import resource
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

SIPP: Final = shutil.which("sipp")
SCENARIOS: Final = Path(__file__).resolve().parent / "scenarios"

#: A call whose expected message does not come within this many ms fails.
RECV_TIMEOUT_MS: Final = 5000
#: Seconds the process may outlive sipp's own ``-timeout`` before it is killed.
KILL_MARGIN_SECONDS: Final = 10.0

_SENT = re.compile(r"\d+_([A-Z]+)_Sent")
_RECV = re.compile(r"\d+_(\d{3})_Recv")


def free_port(kind: socket.SocketKind, host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free right now (TCP or UDP)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def max_sockets() -> int:
    """sipp refuses to start unless ``-max_socket`` is below the open-files limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft - 128))


def _last_row(path: Path) -> dict[str, str]:
    """The header and last data row of a sipp CSV file (``;``-separated), as a dict."""
    rows = [row for row in csv.reader(path.read_text(errors="replace").splitlines(), delimiter=";") if row]
    if len(rows) < 2:
        raise AssertionError(f"sipp wrote no data row to {path}")
    header, last = rows[0], rows[-1]
    return {name: value for name, value in zip(header, last, strict=False) if name}


@dataclass(frozen=True)
class SippResult:
    """What one finished sipp run reported."""

    command: list[str]
    returncode: int
    stats: dict[str, str]
    counts: dict[str, int]
    screen: str
    errors: str
    output: str

    def stat(self, name: str) -> int:
        """A cumulative counter of the statistics file, e.g. ``stat("SuccessfulCall")``."""
        return int(self.stats[f"{name}(C)"])

    @property
    def created(self) -> int:
        return self.stat("OutgoingCall")

    @property
    def successful(self) -> int:
        return self.stat("SuccessfulCall")

    @property
    def failed(self) -> int:
        return self.stat("FailedCall")

    @property
    def requests_sent(self) -> int:
        """Requests sipp sent, over every send step of the scenario (over TCP sipp never retransmits)."""
        return sum(value for name, value in self.counts.items() if _SENT.fullmatch(name))

    @property
    def retransmissions(self) -> int:
        return sum(value for name, value in self.counts.items() if name.endswith("_Retrans"))

    def sent(self, method: str) -> int:
        """How many ``method`` requests sipp sent, over every step of the scenario."""
        return sum(value for name, value in self.counts.items() if (m := _SENT.fullmatch(name)) and m[1] == method)

    def received(self, status: int) -> int:
        """How many ``status`` responses arrived where the scenario expected them."""
        return sum(value for name, value in self.counts.items() if (m := _RECV.fullmatch(name)) and m[1] == str(status))

    def unexpected(self) -> int:
        return sum(value for name, value in self.counts.items() if name.endswith("_Unexp"))

    def describe(self) -> str:
        """Everything useful for an assertion message."""
        nonzero = {name: value for name, value in self.counts.items() if value}
        failures = {name: value for name, value in self.stats.items() if name.startswith("Failed") and value != "0"}
        return (
            f"sipp rc={self.returncode} created={self.stats.get('OutgoingCall(C)')} "
            f"successful={self.stats.get('SuccessfulCall(C)')} failed={self.stats.get('FailedCall(C)')}\n"
            f"failure counters: {failures}\nmessage counts: {nonzero}\n"
            f"command: {' '.join(self.command)}\n"
            f"errors (tail): {self.errors[-2000:]}\noutput (tail): {self.output[-1500:]}"
        )


class Sipp:
    """One running sipp process; use as a context manager so it never outlives the test."""

    def __init__(
        self,
        host: str,
        port: int,
        workdir: Path,
        *,
        scenario: str,
        transport: str,
        calls: int,
        rate: int,
        timeout: float,
        extra_args: Sequence[str] = (),
        local_ip: str = "127.0.0.1",
    ) -> None:
        """``local_ip``: the address sipp binds and sends from (another loopback address is another source)."""
        if SIPP is None:
            raise RuntimeError("sipp is not on PATH")
        if transport not in ("t1", "tn"):
            raise ValueError(f"transport {transport!r}: sipp TCP modes are t1 and tn")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        scenario_args = ["-sf", str(SCENARIOS / scenario)] if scenario.endswith(".xml") else ["-sn", scenario]
        self.command = [
            SIPP, f"{host}:{port}", *scenario_args,
            "-t", transport,
            "-i", local_ip,
            "-p", str(free_port(socket.SOCK_STREAM, local_ip)),
            "-ci", "127.0.0.1",
            "-cp", str(free_port(socket.SOCK_DGRAM)),
            "-m", str(calls),
            "-r", str(rate),
            "-timeout", f"{int(timeout)}s",
            "-timeout_error",
            "-recv_timeout", str(RECV_TIMEOUT_MS),
            "-max_socket", str(max_sockets()),
            "-nostdin",
            "-trace_stat", "-stf", "stats.csv", "-fd", "1",
            "-trace_counts",
            "-trace_screen", "-screen_file", "screen.log",
            "-trace_err", "-error_file", "errors.log",
            *extra_args,
        ]  # fmt: skip
        self.deadline = timeout + KILL_MARGIN_SECONDS
        self._output_path = workdir / "sipp-output.log"
        with open(self._output_path, "wb") as output:
            self.process = subprocess.Popen(
                self.command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )

    def __enter__(self) -> Sipp:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def wait(self) -> SippResult:
        """Wait for sipp to finish (killing it past its deadline) and read its files."""
        try:
            returncode = self.process.wait(self.deadline)
        except subprocess.TimeoutExpired:
            self.kill()
            output = self._output_path.read_text(errors="replace")
            raise AssertionError(f"sipp did not finish within {self.deadline}s: {output[-2000:]}") from None
        output = self._output_path.read_text(errors="replace")
        stats_path = self.workdir / "stats.csv"
        counts_paths = sorted(self.workdir.glob(f"*_{self.process.pid}_counts.csv"))
        if not stats_path.exists() or not counts_paths:
            raise AssertionError(f"sipp (rc {returncode}) wrote no statistics: {output[-2000:]}")
        counts = {name: int(value) for name, value in _last_row(counts_paths[0]).items() if value.isdigit()}
        screen_path, errors_path = self.workdir / "screen.log", self.workdir / "errors.log"
        return SippResult(
            command=self.command,
            returncode=returncode,
            stats=_last_row(stats_path),
            counts=counts,
            screen=screen_path.read_text(errors="replace") if screen_path.exists() else "",
            errors=errors_path.read_text(errors="replace") if errors_path.exists() else "",
            output=output,
        )


def run_sipp(
    host: str,
    port: int,
    workdir: Path,
    *,
    scenario: str,
    transport: str,
    calls: int,
    rate: int,
    timeout: float,
    extra_args: Sequence[str] = (),
    local_ip: str = "127.0.0.1",
) -> SippResult:
    """Run sipp to completion; see :class:`Sipp`."""
    with Sipp(
        host, port, workdir, scenario=scenario, transport=transport, calls=calls, rate=rate, timeout=timeout,
        extra_args=extra_args, local_ip=local_ip,
    ) as sipp:  # fmt: skip
        return sipp.wait()
