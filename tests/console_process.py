"""A real ``sipwire console`` child process for the console tests (API and browser).

``console_starter(tmp_path)`` backs the ``start_console`` fixture of the
console test modules. ``start_console(transport)`` runs ``python -m sipwire.cli console`` on a
free loopback port, pointed at the instance and state directory of a
transport started by ``start_transport`` (or at a name where none runs yet),
waits until it answers, and stops it when the test ends.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import REPO, RunningTransport, stop_process

CONSOLE_START_SECONDS = 20.0
LISTENING = re.compile(r"console listening on http://(\S+?)/")


@dataclass
class RunningConsole:
    process: subprocess.Popen[bytes]
    url: str
    token: str
    log_path: Path
    token_path: Path

    def client(self, authorized: bool = False, **options: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if authorized else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10.0, **options)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        return stop_process(self.process, timeout)


def traces_to(console: RunningConsole) -> dict[str, str]:
    """Environment for a transport that exports every trace to ``console``'s OTLP receiver, promptly."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{console.url}/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def transport_target(running: RunningTransport) -> tuple[str, Path]:
    """The instance name and state directory of a transport from ``start_transport``."""
    return running.control_path.parent.name, running.control_path.parent.parent


def console_starter(tmp_path: Path) -> Iterator[Callable[..., RunningConsole]]:
    """The body of each console test module's ``start_console`` fixture: yields the starter, then stops all."""
    started: list[RunningConsole] = []

    def start(
        transport: RunningTransport | None = None,
        *,
        instance: str | None = None,
        state_dir: Path | None = None,
        token: str | None = "generate-a-fresh-one",
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> RunningConsole:
        if transport is not None:
            instance, state_dir = transport_target(transport)
        assert instance is not None and state_dir is not None, "name a transport, or an instance and state_dir"
        index = len(started)
        log_path = tmp_path / f"console{index}.log"
        token_path = tmp_path / f"console{index}.token"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        full_env.pop("SIPWIRE_ADMIN_TOKEN", None)
        if token == "generate-a-fresh-one":
            token = secrets.token_urlsafe(24)
        if token is not None:
            full_env["SIPWIRE_ADMIN_TOKEN"] = token
        full_env["SIPWIRE_CONSOLE_TOKEN_FILE"] = str(token_path)
        command = [
            sys.executable, "-m", "sipwire.cli", "console", "--listen", "127.0.0.1:0", "--instance", instance,
            "--state-dir", str(state_dir), *extra_args,
        ]  # fmt: skip
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
        deadline = time.monotonic() + CONSOLE_START_SECONDS
        url = ""
        while time.monotonic() < deadline and process.poll() is None:
            match = LISTENING.search(log_path.read_text(errors="replace"))
            if match:
                url = f"http://{match.group(1)}".replace("//0.0.0.0:", "//127.0.0.1:")  # a wildcard: ask loopback
                try:
                    if httpx.get(f"{url}/api/health", timeout=2.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        else:
            process.kill()
            process.wait()
            raise RuntimeError(f"console did not start: {log_path.read_text(errors='replace')}")
        if token is None:
            token = token_path.read_text().strip()
        running = RunningConsole(process, url, token, log_path, token_path)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
