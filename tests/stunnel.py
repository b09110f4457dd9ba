"""Run the real ``stunnel`` (Debian ``stunnel4``) as a TLS client in front of sipp.

sipp speaks plain TCP; stunnel in client mode accepts sipp's TCP connections
on a free 127.0.0.1 port and opens one TLS connection to the transport for
each of them. The configuration avoids stunnel's defaults that would skew a
test (see ``/work/shared/bench/README.md`` pitfall 8 for the reasons):

* ``debug = 3``: errors only, not a log line per connection;
* ``sessionResume = no``: every new connection is a full handshake;
* ``TIMEOUTclose = 0``: no thread waits for the server's close_notify;
* ``foreground = yes`` and an empty ``pid``: the child is ours, stopped by its PID.

:class:`Stunnel` is a context manager that waits (bounded) until the accept
port listens and kills the process by PID at the end.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Final

STUNNEL: Final = shutil.which("stunnel4") or shutil.which("stunnel")
START_SECONDS: Final = 10.0
STOP_SECONDS: Final = 5.0
#: ``st`` column of /proc/net/tcp for a listening socket.
TCP_LISTEN: Final = "0A"


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (read from /proc, without connecting to it)."""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == TCP_LISTEN:
            return True
    return False


class Stunnel:
    """One stunnel client process: ``127.0.0.1:accept_port`` (TCP) to ``127.0.0.1:connect_port`` (TLS)."""

    def __init__(self, workdir: Path, accept_port: int, connect_port: int, *, ca_file: Path | None = None) -> None:
        if STUNNEL is None:
            raise RuntimeError("stunnel is not on PATH")
        workdir.mkdir(parents=True, exist_ok=True)
        self.accept_port = accept_port
        self.log_path = workdir / "stunnel.log"
        verify = (
            [f"CAfile = {ca_file}", "verifyChain = yes", "checkIP = 127.0.0.1"] if ca_file else ["verifyChain = no"]
        )
        lines = [
            "foreground = yes",
            "pid =",
            "debug = 3",
            f"output = {self.log_path}",
            "",
            "[sip-tls]",
            "client = yes",
            f"accept = 127.0.0.1:{accept_port}",
            f"connect = 127.0.0.1:{connect_port}",
            *verify,
            "sessionResume = no",
            "TIMEOUTclose = 0",
        ]
        self.config_path = workdir / "stunnel.conf"
        self.config_path.write_text("\n".join(lines) + "\n")
        self._console_path = workdir / "stunnel-console.log"
        with open(self._console_path, "wb") as console:
            self.process = subprocess.Popen(
                [STUNNEL, str(self.config_path)], stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
            )
        try:
            self._wait_listening()
        except BaseException:
            self.kill()
            raise

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while not listening(self.accept_port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"stunnel did not start listening on {self.accept_port}: {self.output()[-2000:]}")
            time.sleep(0.02)

    def output(self) -> str:
        """Console output and log file, for assertion messages."""
        parts = [path.read_text(errors="replace") for path in (self._console_path, self.log_path) if path.exists()]
        return "\n".join(parts)

    def kill(self) -> None:
        """Stop this stunnel by its PID: SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(STOP_SECONDS)

    def __enter__(self) -> Stunnel:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.kill()
