"""Shared fixtures: a real transport process (with real workers) on loopback.

``start_transport(**settings)`` launches ``sipwire transport`` as a child
process on a free port, with its own instance name and state directory,
waits until its control socket answers, and stops it (SIGTERM, then
checks that no worker is left behind) when the test ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from transport.control import ControlClient, ControlError

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0


@dataclass
class RunningTransport:
    """A transport child process and how to reach it."""

    process: subprocess.Popen[bytes]
    control_path: Path
    host: str
    port: int
    log_path: Path
    worker_pids: list[int] = field(default_factory=list)

    def control(self, op: str, **arguments: Any) -> Any:
        with ControlClient(self.control_path) as client:
            return client.request(op, **arguments)

    def counters(self) -> dict[str, int]:
        return dict(self.control("stats")["counters"])

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def start_transport(tmp_path: Path) -> Iterator[Callable[..., RunningTransport]]:
    started: list[RunningTransport] = []

    def start(*extra_args: str, env: dict[str, str] | None = None, **settings: Any) -> RunningTransport:
        index = len(started)
        state_dir = tmp_path / f"state{index}"
        log_path = tmp_path / f"transport{index}.log"
        args = ["--tcp", "127.0.0.1:0", "--instance", f"test{index}", "--state-dir", str(state_dir)]
        for name, value in settings.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        command = [sys.executable, "-m", "sipwire.cli", "transport", *args, *extra_args]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
        control_path = state_dir / f"test{index}" / "control.sock"
        deadline = time.monotonic() + START_TIMEOUT
        health: dict[str, Any] | None = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with ControlClient(control_path, timeout=2.0) as client:
                    health = client.request("health")
                    workers = client.request("stats")["workers"]
                if all(w["alive"] for w in workers):
                    break
            except ControlError:
                pass
            time.sleep(0.05)
        if health is None:
            process.kill()
            raise RuntimeError(f"transport did not start: {log_path.read_text(errors='replace')}")
        host, _, port = health["listening"]["tcp"].rpartition(":")
        running = RunningTransport(process, control_path, host.strip("[]"), int(port), log_path)
        running.worker_pids = [w["pid"] for w in workers]
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
        deadline = time.monotonic() + 5.0
        while any(_pid_alive(pid) for pid in running.worker_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = [pid for pid in running.worker_pids if _pid_alive(pid)]
        assert not orphans, f"worker processes left behind: {orphans}"
