"""Drive the real ``baresip`` (Debian package) as a SIP phone, through its ``ctrl_tcp`` control interface.

:class:`Baresip` writes a configuration directory for one user agent
(``config`` and ``accounts``, read with ``baresip -f DIR``): no sound card
(``ausine`` is the microphone, ``aubridge`` the speaker), G.711, the
``uuid`` (the ``+sip.instance`` of RFC 5626), ``account`` and ``menu``
modules, and ``ctrl_tcp`` on a free loopback port.
Its one account registers through sipwire as outbound proxy (RFC 5626
``sipnat=outbound``: ``+sip.instance`` and ``reg-id``), with digest
credentials, and answers calls by itself (``answermode=auto``).

``ctrl_tcp`` speaks JSON in netstrings: commands ``{"command": "dial",
"params": URI}``, and every event (``REGISTER_OK``, ``CALL_ESTABLISHED``,
``CALL_CLOSED``...) as ``{"event": true, "type": ...}``; a reader thread
collects them for :meth:`Baresip.wait_event`. The process is stopped by its
PID (``quit``, then SIGTERM, then SIGKILL) and its log kept for assertions.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from tests.sipp import free_port

BARESIP: Final = shutil.which("baresip")
MODULE_PATH: Final = Path("/usr/lib/baresip/modules")
START_SECONDS: Final = 10.0
#: What baresip prints when a REGISTER of its account is answered 200 (``{1/TCP/v4} 200 OK () [1 binding]``).
REGISTERED_LINE = re.compile(r"\} 200 OK \(.*\) \[\d+ bindings?\]")
STOP_SECONDS: Final = 5.0

CONFIG: Final = """\
poll_method             epoll
sip_listen              127.0.0.1:{sip_port}
audio_player            aubridge,{name}-speaker
audio_source            ausine,440
audio_alert             aubridge,{name}-alert
ausrc_srate             48000
ausrc_channels          2
rtp_ports               {rtp_low}-{rtp_high}
module_path             {module_path}
module                  g711.so
module                  ausine.so
module                  aubridge.so
module                  uuid.so
module_app              account.so
module_app              menu.so
module_app              ctrl_tcp.so
ctrl_tcp_listen         127.0.0.1:{ctrl_port}
"""


def _free_port_pair() -> int:
    """A free TCP port whose successor is free too: baresip listens for SIP over TLS on sip_listen's port + 1."""
    for _ in range(100):
        port = free_port(socket.SOCK_STREAM)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free TCP ports on 127.0.0.1")


class Baresip:
    """One baresip process with one account; use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        aor: str,
        password: str,
        proxy: str,
        transport: str,
    ) -> None:
        if BARESIP is None:
            raise RuntimeError("baresip is not on PATH")
        self.name = name
        self.directory = workdir / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ctrl_port = free_port(socket.SOCK_STREAM)
        rtp_low = 20000 + 100 * (self.ctrl_port % 300)
        (self.directory / "config").write_text(
            CONFIG.format(
                sip_port=_free_port_pair(), name=name, rtp_low=rtp_low, rtp_high=rtp_low + 20,
                module_path=MODULE_PATH, ctrl_port=self.ctrl_port,
            )
        )  # fmt: skip
        account = (
            f"<sip:{aor};transport={transport}>;auth_pass={password};"
            f'outbound="sip:{proxy};transport={transport};lr";sipnat=outbound;regint=300;answermode=auto\n'
        )
        (self.directory / "accounts").write_text(account)
        self.log_path = workdir / f"{name}.log"
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [BARESIP, "-f", str(self.directory)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._sock = self._connect()
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                return socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=1.0)
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"baresip {self.name} did not start: {self.log()[-2000:]}") from None
                time.sleep(0.05)

    def _read_events(self) -> None:
        buffer = b""
        self._sock.settimeout(None)
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b":" in buffer:
                length_text, _, rest = buffer.partition(b":")
                length = int(length_text)
                if len(rest) < length + 1:
                    break
                payload, buffer = rest[:length], rest[length + 1 :]
                with self._lock:
                    self.events.append(json.loads(payload))

    def command(self, command: str, params: str = "") -> None:
        payload = json.dumps({"command": command, "params": params, "token": command}).encode()
        self._sock.sendall(f"{len(payload)}:".encode() + payload + b",")

    def event_types(self) -> list[str]:
        with self._lock:
            return [str(event.get("type")) for event in self.events if event.get("event")]

    def _seen(self, kind: str) -> bool:
        """An event on the control connection; a registration also by baresip's own log line, because it
        can succeed before the control connection is up, and its event then reaches nobody."""
        if kind in self.event_types():
            return True
        return kind == "REGISTER_OK" and REGISTERED_LINE.search(self.log()) is not None

    def wait_event(self, kind: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._seen(kind):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(
                    f"baresip {self.name}: no {kind} within {timeout}s; events {self.event_types()}\n"
                    f"{self.log()[-3000:]}"
                )
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.command("quit")
                self.process.wait(STOP_SECONDS)
            except (OSError, AttributeError, subprocess.TimeoutExpired):
                self.process.terminate()
                try:
                    self.process.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def __enter__(self) -> Baresip:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
