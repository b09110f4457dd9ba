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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sipwire.errors import ControlError
from sipwire.transport.control import ControlClient

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
    tls_port: int = 0  # 0 when the transport runs without TLS
    ws_port: int = 0  # 0 unless started with ws=...
    wss_port: int = 0  # 0 unless started with wss=...

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
        return stop_process(self.process, timeout)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def start_transport(tmp_path: Path) -> Iterator[Callable[..., RunningTransport]]:
    started: list[RunningTransport] = []

    def start(
        *extra_args: str,
        env: dict[str, str] | None = None,
        users: dict[str, str] | None = None,
        restart_of: RunningTransport | None = None,
        **settings: Any,
    ) -> RunningTransport:
        """``users``: USER@DOMAIN to password, added to the registrar database before the start.

        ``restart_of``: a stopped transport whose instance and state directory this one takes over.
        """
        index = len(started)
        log_path = tmp_path / f"transport{index}.log"
        state_dir = tmp_path / f"state{index}" if restart_of is None else restart_of.control_path.parent.parent
        instance = f"test{index}" if restart_of is None else restart_of.control_path.parent.name
        if users:
            add_users(state_dir, instance, users)
        args = ["--tcp", "127.0.0.1:0", "--tls", "127.0.0.1:0", "--instance", instance]
        args += ["--state-dir", str(state_dir)]
        for name, value in settings.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        command = [sys.executable, "-m", "sipwire.cli", "transport", *args, *extra_args]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
        control_path = state_dir / instance / "control.sock"
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
        if "tls" in health["listening"]:
            running.tls_port = int(health["listening"]["tls"].rpartition(":")[2])
        for name in ("ws", "wss"):
            if name in health["listening"]:
                setattr(running, f"{name}_port", int(health["listening"][name].rpartition(":")[2]))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
        deadline = time.monotonic() + 5.0
        while any(pid_alive(pid) for pid in running.worker_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = [pid for pid in running.worker_pids if pid_alive(pid)]
        assert not orphans, f"worker processes left behind: {orphans}"


def add_users(state_dir: Path, instance: str, users: dict[str, str]) -> None:
    """Add proxy users to an instance's registrar database (what ``sipwire users add`` does)."""
    from sipwire.config import Settings
    from sipwire.transport.routers.digest import credentials_for
    from sipwire.transport.routers.sqlitestore import open_store

    store = open_store(Settings(instance=instance, state_dir=str(state_dir)))
    try:
        for aor, password in users.items():
            store.add_user(credentials_for(aor, password))
    finally:
        store.close()


# -- helpers for the integration tests (SIP client, polling, config files, the ctl CLI) ------------

#: How long a test waits for something that should happen at once on loopback.
WAIT_SECONDS = 5.0


def wait_for(condition: Callable[[], Any], timeout: float = WAIT_SECONDS, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns a truthy value (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {value!r}")
        time.sleep(0.02)


def write_config(directory: Path, **values: Any) -> Path:
    """A TOML config file with ``values`` (keys are Settings field names); returns its path."""
    lines = []
    for name, value in values.items():
        rendered = f'"{value}"' if isinstance(value, str) else repr(value)
        lines.append(f"{name} = {rendered}")
    path = directory / f"config{len(list(directory.glob('config*.toml')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_ctl(running: RunningTransport, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sipwire.cli ctl`` against ``running`` as a subprocess."""
    instance = running.control_path.parent.name
    state_dir = running.control_path.parent.parent
    command = [sys.executable, "-m", "sipwire.cli", "ctl", "--instance", instance, "--state-dir", str(state_dir), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False)


def sip_request(
    method: str,
    cseq: int = 1,
    *,
    call_id: str = "call-1@test",
    branch: str | None = None,
    uri: str = "sip:service@127.0.0.1",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    content_length: str | None = None,
    omit: Sequence[str] = (),
) -> bytes:
    """A SIP request over TCP; ``content_length`` overrides the computed value, ``omit`` drops headers."""
    fields = [
        ("Via", f"SIP/2.0/TCP 127.0.0.1:5999;branch={branch or f'z9hG4bK-{call_id}-{cseq}'}"),
        ("Max-Forwards", "70"),
        ("From", "<sip:alice@127.0.0.1>;tag=from-tag-1"),
        ("To", "<sip:service@127.0.0.1>"),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} {method}"),  # ACK and CANCEL name themselves too (RFC 3261 sections 9.1, 17.1.1.3)
        *headers,
        ("Content-Length", str(len(body)) if content_length is None else content_length),
    ]
    lines = [f"{method} {uri} SIP/2.0"] + [f"{name}: {value}" for name, value in fields if name not in omit]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class SipResponse:
    """A response read back by :class:`SipClient` (header names lower-cased, in order)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]


class SipClient:
    """A blocking SIP-over-TCP test client with its own receive buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    @classmethod
    def connect(cls, running: RunningTransport) -> SipClient:
        return cls(running.connect())

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for data; buffered {bytes(self.buffer)[:200]!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for data; buffered {bytes(self.buffer)[:200]!r}") from None
        if not data:
            raise AssertionError(f"connection closed by the transport; buffered {bytes(self.buffer)[:200]!r}")
        self.buffer += data

    def read_exact(self, count: int, timeout: float = WAIT_SECONDS) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buffer) < count:
            self._fill(deadline)
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def read_response(self, timeout: float = WAIT_SECONDS) -> SipResponse:
        """Read one whole message (headers, then Content-Length bytes of body)."""
        deadline = time.monotonic() + timeout
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._fill(deadline)
        head = bytes(self.buffer[:end]).decode()
        lines = head.split("\r\n")
        version, status, reason = lines[0].split(" ", 2)
        assert version == "SIP/2.0", f"not a SIP response: {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon, f"header line without colon in response: {line!r}"
            headers.append((name.strip().lower(), value.strip()))
        lengths = [value for name, value in headers if name == "content-length"]
        assert len(lengths) == 1, f"response must have exactly one Content-Length: {head!r}"
        total = end + 4 + int(lengths[0])
        while len(self.buffer) < total:
            self._fill(deadline)
        raw = bytes(self.buffer[:total])
        del self.buffer[:total]
        return SipResponse(int(status), reason, headers, raw[end + 4 :], raw)

    def read_until_closed(self, timeout: float = WAIT_SECONDS) -> bytes:
        """Read until the transport closes the connection; return everything not yet consumed."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"connection still open after {timeout}s; got {bytes(self.buffer)[:200]!r}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            self.buffer += data
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SipClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
