"""``sipwire run``'s console child: started, watched, restarted with back-off, never left a zombie.

The transport runs in the ``sipwire run`` process itself; the console is a
child process (``sipwire console``). A watcher thread waits on the child, so
its exit is reaped at once and logged with its cause (exit status or
signal); while the transport runs, a console that exits is started again
after a back-off that doubles up to :data:`MAX_BACKOFF_SECONDS` (and starts
over once a console has stayed up for :data:`STABLE_SECONDS`). When the
transport ends, :meth:`ConsoleSupervisor.stop` stops the console.

The console gets its own process group, so a terminal's Ctrl-C reaches only
the transport, which stops first and then stops the console here, in that
order. It also gets a *lifeline*: the read end of a pipe whose write end
only this process holds. When this process dies, even by SIGKILL, the
console reads EOF on it and stops (``sipwire.console.serve``), as workers do
when their channel closes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Final

log = logging.getLogger("sipwire.run")

#: First wait before starting a console that exited; doubled per quick exit.
FIRST_BACKOFF_SECONDS: Final = 1.0
#: The longest wait between two starts of a console that keeps exiting.
MAX_BACKOFF_SECONDS: Final = 30.0
#: A console that ran this long before exiting is restarted after the first back-off again.
STABLE_SECONDS: Final = 60.0
#: How long :meth:`ConsoleSupervisor.stop` waits for the console before killing it.
STOP_SECONDS: Final = 5.0


def describe_exit(returncode: int) -> str:
    """``exit status 1`` or ``killed by SIGKILL``: how a child ended, for the log."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class ConsoleSupervisor:
    """Starts ``command`` (the console) and keeps it running until :meth:`stop`."""

    def __init__(self, command: Sequence[str]) -> None:
        self._command = list(command)
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # orders a restart against stop()
        self._process: subprocess.Popen[bytes] | None = None
        self._lifeline_write = -1
        self._thread = threading.Thread(target=self._watch, name="sipwire-console-watch", daemon=True)
        self.starts = 0

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    def start(self) -> None:
        read_end, self._lifeline_write = os.pipe2(os.O_CLOEXEC)
        try:
            with self._lock:
                self._spawn(read_end)
        finally:
            os.close(read_end)  # the children hold their own copy
        self._thread.start()

    def _spawn(self, lifeline: int) -> None:
        command = [*self._command, "--lifeline", str(lifeline)]
        self._process = subprocess.Popen(command, pass_fds=(lifeline,), process_group=0)
        self.starts += 1
        log.info("console started, pid %d", self._process.pid)

    def _watch(self) -> None:
        backoff = FIRST_BACKOFF_SECONDS
        while True:
            process = self._process
            assert process is not None
            started = time.monotonic()
            returncode = process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STABLE_SECONDS:
                backoff = FIRST_BACKOFF_SECONDS
            log.error(
                "console (pid %d) stopped unexpectedly: %s; starting it again in %.0fs",
                process.pid, describe_exit(returncode), backoff,
            )  # fmt: skip
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            with self._lock:
                if self._stopping.is_set():
                    os.close(read_end)
                    os.close(write_end)
                    return
                os.close(self._lifeline_write)
                self._lifeline_write = write_end
                try:
                    self._spawn(read_end)
                except OSError as error:
                    log.error("cannot start the console: %s", error)
                finally:
                    os.close(read_end)

    def stop(self, reason: str) -> None:
        """Stop the console (SIGTERM, then SIGKILL after :data:`STOP_SECONDS`) and reap it."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            log.info("%s: stopping the console (pid %d)", reason, process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("console (pid %d) did not stop within %.0fs: killing it", process.pid, STOP_SECONDS)
                process.kill()
                process.wait()
        if self._lifeline_write >= 0:
            os.close(self._lifeline_write)
            self._lifeline_write = -1
        if self._thread.is_alive():
            self._thread.join(STOP_SECONDS)
