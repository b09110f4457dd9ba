"""Hands span records to this process's exporter process over a pipe.

The exporter process (``python -m sipwire.otel.exporter``) is started with
``subprocess`` (fork and exec: nothing of this multi-threaded process is
inherited but the pipe) when telemetry starts, so that its imports are
done before SIP traffic comes. Frames on its stdin are a
4-byte big-endian length and a :mod:`marshal` dump of a list of records
(tuples of plain values), at most :data:`MAX_FRAME_BYTES`.

The write runs on the telemetry thread and may block when the exporter is
behind: the record queue then fills and the I/O threads drop and count,
which is the intended back-pressure. An exporter that exits is logged once
and started again, at most once per :data:`RESTART_SECONDS`; batches in
between are dropped and counted. Closing stdin is the stop signal: the
exporter exports what it holds (bounded) and exits.
"""

from __future__ import annotations

import logging
import marshal
import subprocess
import sys
import threading
import time
from typing import IO, Any, Final

log = logging.getLogger("sipwire.telemetry")

#: One frame's upper bound; the exporter treats a larger length as a corrupt stream.
MAX_FRAME_BYTES: Final = 64 << 20
#: An exporter process that exited is started again at most this often.
RESTART_SECONDS: Final = 10.0


class ProcessDelivery:
    """Writes record batches to an exporter child process; see the module docstring."""

    def __init__(self, service: str, instance: str) -> None:
        self.service = service
        self.instance = instance
        self.dropped = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stdin: IO[bytes] | None = None
        self._started_at = -RESTART_SECONDS
        self._exit_logged = False
        self._lock = threading.Lock()  # the telemetry thread writes; close() may come from another thread

    def start(self) -> None:
        """Start the exporter process now, before traffic (else it starts with the first batch)."""
        with self._lock:
            if self._process is None:
                self._start()

    def _start(self) -> bool:
        now = time.monotonic()
        if now - self._started_at < RESTART_SECONDS:
            return False
        self._started_at = now
        command = [
            sys.executable,
            "-m",
            "sipwire.otel.exporter",
            "--service",
            self.service,
            "--instance",
            self.instance,
        ]
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        except OSError as error:
            log.error("telemetry: cannot start the exporter process: %s", error)
            return False
        self._stdin = self._process.stdin
        self._exit_logged = False
        log.info("telemetry: exporter process for %s started (pid %d)", self.service, self._process.pid)
        return True

    def __call__(self, records: list[Any]) -> None:
        payload = marshal.dumps(records)
        if len(payload) > MAX_FRAME_BYTES:
            self.dropped += len(records)
            return
        with self._lock:
            if (self._process is None or self._process.poll() is not None) and not self._restart():
                self.dropped += len(records)
                return
            assert self._stdin is not None
            try:
                self._stdin.write(len(payload).to_bytes(4, "big") + payload)
                self._stdin.flush()
            except (OSError, ValueError):  # the exporter exited (broken pipe) or we are closing
                self.dropped += len(records)
                self._log_exit()

    def _restart(self) -> bool:
        if self._process is not None:
            self._log_exit()
            if self._stdin is not None:
                self._close_stdin()
        return self._start()

    def _log_exit(self) -> None:
        if self._exit_logged or self._process is None:
            return
        self._exit_logged = True
        status = self._process.poll()
        log.warning(
            "telemetry: exporter process for %s (pid %d) exited with %s; spans are dropped until it is restarted",
            self.service, self._process.pid, status,
        )  # fmt: skip

    def _close_stdin(self) -> None:
        try:
            if self._stdin is not None:
                self._stdin.close()
        except OSError:
            pass

    def close(self, timeout: float) -> None:
        """Close the pipe (the exporter exports what it holds and exits) and wait up to ``timeout`` s."""
        with self._lock:
            process = self._process
            self._close_stdin()
        if process is None:
            return
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("telemetry: exporter process %d still busy after %.1fs: killed", process.pid, timeout)
            process.kill()
            process.wait()
