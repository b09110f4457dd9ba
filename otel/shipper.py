"""Hands span batches to the instance's one exporter process over a pipe, and reads back what it exported.

The exporter process (``python -m sipwire.otel.exporter``) is started with
``subprocess`` (fork and exec: nothing of this multi-threaded process is
inherited but the pipes) when telemetry starts, so that its imports are
done before SIP traffic comes. Frames on its stdin are a 4-byte big-endian
length, then ``!iI`` the source (worker index, -1 for the transport, and
pid) and a :mod:`marshal` dump of a list of records (tuples of plain
values), at most :data:`MAX_FRAME_BYTES`. The pipe is enlarged to
:data:`PIPE_BYTES` where the kernel allows it, so a burst waits there while
the exporter sends a batch.

The write runs on the telemetry thread and may block when the exporter is
behind: the record queues then fill and the I/O threads drop and count,
which is the intended back-pressure. An exporter that exits is logged once
and started again, at most once per :data:`RESTART_SECONDS`; batches in
between are dropped and counted. Closing stdin is the stop signal: the
exporter exports what it holds (bounded) and exits.

On a status pipe of its own (``--status-fd``) the exporter writes, once its
imports are done and after each export, a line of its running totals
(``exported failed``): spans the collector took and spans whose export
failed. The telemetry thread reads them without blocking, so the transport's
counters cover the exporter too. Its stdout is the transport's stderr (the
``console`` exporter prints there, into the transport's log).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import struct
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Final

if TYPE_CHECKING:
    from sipwire.otel.pipeline import Batch

log = logging.getLogger("sipwire.telemetry")

#: One frame's upper bound; the exporter treats a larger length as a corrupt stream.
MAX_FRAME_BYTES: Final = 64 << 20
#: An exporter process that exited is started again at most this often.
RESTART_SECONDS: Final = 10.0
#: The pipe to the exporter (Linux's default is 64 KiB; 1 MiB is the usual unprivileged maximum).
PIPE_BYTES: Final = 1 << 20
#: How long starting telemetry waits for the exporter's imports (its first totals line) before traffic.
READY_SECONDS: Final = 5.0
#: A frame's source: worker index (-1: the transport) and pid.
SOURCE: Final = struct.Struct("!iI")


class ProcessDelivery:
    """Writes record batches to the exporter child process; see the module docstring."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.dropped = 0
        self._exported = (0, 0)  # (exported, failed) reported by the exporter process now running
        self._before = (0, 0)  # the same, summed over exporter processes that exited
        self._status = b""
        self._status_seen = False
        self._process: subprocess.Popen[bytes] | None = None
        self._status_fd = -1  # read end of the running exporter's status pipe (non-blocking)
        self._stdin: IO[bytes] | None = None
        self._started_at = -RESTART_SECONDS
        self._exit_logged = False
        self._lock = threading.Lock()  # the telemetry thread writes; close() may come from another thread

    def start(self) -> None:
        """Start the exporter process now and wait (bounded) until it is ready, so its imports precede traffic.

        Its imports take about half a second of CPU; on a small machine they would otherwise
        compete with the first second of SIP traffic.
        """
        with self._lock:
            if self._process is None and self._start():
                self._wait_ready(READY_SECONDS)

    def _wait_ready(self, timeout: float) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + timeout
        while not self._status_seen and time.monotonic() < deadline and process.poll() is None:
            select.select([self._status_fd], [], [], max(0.0, deadline - time.monotonic()))
            self._read_status()
        if not self._status_seen:
            log.warning("telemetry: the exporter process is not ready after %.0fs; traffic starts anyway", timeout)

    def _start(self) -> bool:
        now = time.monotonic()
        if now - self._started_at < RESTART_SECONDS:
            return False
        self._started_at = now
        status_read, status_write = os.pipe2(os.O_CLOEXEC)
        command = [
            sys.executable, "-m", "sipwire.otel.exporter", "--instance", self.instance, "--status-fd", str(status_write)
        ]  # fmt: skip
        try:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=2, pass_fds=(status_write,))
        except OSError as error:
            log.error("telemetry: cannot start the exporter process: %s", error)
            os.close(status_read)
            return False
        finally:
            os.close(status_write)
        assert process.stdin is not None
        with contextlib.suppress(OSError, AttributeError):  # a smaller pipe only means less room for bursts
            fcntl.fcntl(process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(status_read, False)
        self._close_status()
        self._status_fd = status_read
        self._before = (self._before[0] + self._exported[0], self._before[1] + self._exported[1])
        self._exported = (0, 0)
        self._status = b""
        self._status_seen = False
        self._process = process
        self._stdin = process.stdin
        self._exit_logged = False
        log.info("telemetry: exporter process for %s started (pid %d)", self.instance, process.pid)
        return True

    def __call__(self, batches: list[Batch], spans: int) -> None:
        self._read_status()
        if not batches:
            return
        # A batch is at most DRAIN_BATCH records or one SPANS record: far below MAX_FRAME_BYTES.
        frames = [
            (len(payload) + SOURCE.size).to_bytes(4, "big") + SOURCE.pack(worker, pid) + payload
            for (worker, pid), payload in batches
        ]
        with self._lock:
            if (self._process is None or self._process.poll() is not None) and not self._restart():
                self.dropped += spans
                return
            assert self._stdin is not None
            try:
                self._stdin.write(b"".join(frames))
                self._stdin.flush()
            except (OSError, ValueError):  # the exporter exited (broken pipe) or we are closing
                self.dropped += spans
                self._log_exit()

    def _read_status(self) -> None:
        """Take the exporter's latest totals line from its status pipe, without blocking."""
        if self._status_fd < 0:
            return
        try:
            data = os.read(self._status_fd, 65536)
        except OSError:  # BlockingIOError: nothing new
            return
        lines = (self._status + data).split(b"\n")
        self._status = lines[-1][-256:]
        for line in reversed(lines[:-1]):
            fields = line.split()
            if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                self._exported = (int(fields[0]), int(fields[1]))
                self._status_seen = True
                break

    def statistics(self) -> dict[str, int]:
        return {
            "dropped_exporter_unavailable": self.dropped,
            "exporter_spans_exported": self._before[0] + self._exported[0],
            "exporter_spans_failed": self._before[1] + self._exported[1],
        }

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
            "telemetry: exporter process (pid %d) exited with %s; spans are dropped until it is restarted",
            self._process.pid, status,
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
        self._read_status()
        self._close_status()

    def _close_status(self) -> None:
        if self._status_fd >= 0:
            os.close(self._status_fd)
            self._status_fd = -1
