"""The transport's control socket: resize, close, snapshots, for tools and the console.

Protocol: a Unix stream socket at ``<runtime dir>/control.sock`` (mode
0600 in a 0700 directory, so only the owner may connect). A client sends
one JSON object per line and gets one JSON object per line back, in
order; a connection may carry several requests. A request line is at most
:data:`MAX_REQUEST_BYTES`; a longer one is answered with an error and the
connection is closed.

Requests (``op`` and its arguments) and their ``result``:

* ``{"op": "health"}``: pid, uptime, listening addresses.
* ``{"op": "threads"}`` / ``{"op": "threads", "size": N}``: the I/O pool,
  resized first when ``size`` is given.
* ``{"op": "connections", "limit": N, "state": S, "transport": T}``.
* ``{"op": "connection", "id": N}``; ``{"op": "close", "id": N}``.
* ``{"op": "stats"}``: counters, queues, workers.
* ``{"op": "calls", ...filters}`` and ``{"op": "call", "call_id": ID}``: the
  call-flow capture, filtered in the transport (:mod:`transport.capturequery`).

Answers are ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
"..."}`` with a sentence naming the offending value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from sipwire.errors import ControlError
from sipwire.statedir import private_directory

log = logging.getLogger("sipwire.control")

MAX_REQUEST_BYTES: Final = 65536
CLIENT_TIMEOUT_SECONDS: Final = 10.0


Handler = Callable[[dict[str, Any]], Any]


class ControlServer:
    """Serves the control protocol on a thread per client; ``handle`` does the work."""

    def __init__(self, path: Path, handle: Handler) -> None:
        self.path = path
        self._handle = handle
        private_directory(path.parent)
        if path.exists():
            _refuse_if_live(path)
            path.unlink()
        outer = self

        class _RequestHandler(socketserver.StreamRequestHandler):
            timeout = CLIENT_TIMEOUT_SECONDS

            def handle(self) -> None:
                outer._serve_client(self.rfile, self.wfile)

        class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        old_umask = os.umask(0o177)
        try:
            self._server = _Server(str(path), _RequestHandler)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self._server.serve_forever, name="sipwire-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a loop that never ran
            self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve_client(self, rfile: Any, wfile: Any) -> None:
        while True:
            try:
                line = rfile.readline(MAX_REQUEST_BYTES + 1)
            except (OSError, TimeoutError):
                return
            if not line:
                return
            if len(line) > MAX_REQUEST_BYTES:
                _write(wfile, {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"})
                return
            _write(wfile, self._answer(line))

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as error:
            return {"ok": False, "error": f"request is not JSON: {error}"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "request must be a JSON object with a string 'op'"}
        try:
            return {"ok": True, "result": self._handle(request)}
        except ControlError as error:
            return {"ok": False, "error": str(error)}
        except Exception:
            log.exception("control request %r failed", request.get("op"))
            return {"ok": False, "error": f"internal error handling {request['op']!r}; see the transport log"}


def _write(wfile: Any, answer: dict[str, Any]) -> None:
    try:
        wfile.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
        wfile.flush()
    except OSError:
        pass


def _refuse_if_live(path: Path) -> None:
    """Refuse to steal the socket of a transport that is still running."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return  # stale socket left by a crash: safe to replace
    finally:
        probe.close()
    raise ControlError(f"another transport is running with control socket {path}; use another --instance")


class ControlClient:
    """Blocking client for scripts and the console."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as error:
            self._sock.close()
            raise ControlError(
                f"cannot reach the transport at {path}: {error.strerror or error}; is `sipwire transport` running "
                "with the same --instance?"
            ) from error
        self._file = self._sock.makefile("rb")

    def request(self, op: str, **arguments: Any) -> Any:
        payload = json.dumps({"op": op, **arguments}).encode() + b"\n"
        try:
            self._sock.sendall(payload)
            line = self._file.readline()
        except OSError as error:
            raise ControlError(f"control socket {self.path} failed during {op!r}: {error}") from error
        if not line:
            raise ControlError(f"transport closed the control connection during {op!r}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise ControlError(answer.get("error", "unknown error"))
        return answer["result"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
