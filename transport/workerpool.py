"""Starts, connects, restarts and stops the worker processes of the unified pool.

Workers are started with ``subprocess`` (not ``fork``: the transport is
multi-threaded) as ``python -m sipwire.transport.worker``, inheriting only their
control socket. For every (I/O thread, worker) pair the pool makes a
socketpair, sends one end to the worker over its control socket
(SCM_RIGHTS) and posts the other to the I/O thread's inbox. At start the
transport waits (:meth:`WorkerPool.wait_ready`) until every worker has
imported its router and run its setup, so that a peer that connects as soon
as the port opens is answered at once, not after a worker's start.

:meth:`WorkerPool.reap` runs on the supervisor loop: a worker that exited
is logged, counted and started again (with a short back-off if it keeps
dying at start). The I/O threads count its in-flight messages as lost
when they see its channels close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sipwire.config import Settings
from sipwire.transport.worker import CONTROL, CONTROL_ADD_CHANNEL, CONTROL_READY, CONTROL_STOP

if TYPE_CHECKING:
    from sipwire.transport.iothread import IOThread

log = logging.getLogger("sipwire.workers")

#: A worker that dies sooner than this after its start is crash-looping:
#: wait this long before the next start instead of spinning.
RESTART_BACKOFF_SECONDS: Final = 1.0


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    index: int
    pid: int
    alive: bool
    restarts: int
    uptime: float


class _WorkerProcess:
    __slots__ = ("control", "index", "process", "restart_at", "restarts", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self.started = 0.0
        self.restarts = 0
        self.restart_at = 0.0


class WorkerPool:
    """The worker processes and their control sockets."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._settings_json = json.dumps(dataclasses.asdict(settings))
        self._workers = [_WorkerProcess(index) for index in range(settings.workers)]

    def __len__(self) -> int:
        return len(self._workers)

    def start(self, threads: tuple[IOThread, ...]) -> None:
        for worker in self._workers:
            self._spawn(worker, threads)

    def wait_ready(self, timeout: float) -> list[int]:
        """Wait until every started worker said it is ready or exited; the indexes still starting at the deadline.

        A worker that exits before it is ready is logged here and restarted by :meth:`reap`, as at any time.
        """
        starting = {worker.index: worker.control for worker in self._workers if worker.control is not None}
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            for index, control in starting.items():
                selector.register(control, selectors.EVENT_READ, index)
            while starting and (left := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(left):
                    control = starting.pop(key.data)
                    selector.unregister(control)
                    try:
                        message = control.recv(CONTROL.size)
                    except OSError:
                        message = b""
                    if len(message) < CONTROL.size or CONTROL.unpack(message)[0] != CONTROL_READY:
                        log.error("worker %d exited before it was ready; see its lines above", key.data)
        return sorted(starting)

    def _spawn(self, worker: _WorkerProcess, threads: tuple[IOThread, ...]) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [
            sys.executable, "-m", "sipwire.transport.worker",
            "--index", str(worker.index),
            "--control-fd", str(child_end.fileno()),
            "--settings", self._settings_json,
        ]  # fmt: skip
        worker.process = subprocess.Popen(command, pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL)
        child_end.close()
        worker.control = parent_end
        worker.started = time.monotonic()
        for thread in threads:
            self.connect(thread, worker.index)
        log.info("worker %d started (pid %d, router %s)", worker.index, worker.process.pid, self._settings.router)

    def connect(self, thread: IOThread, index: int) -> None:
        """Give ``thread`` and worker ``index`` a fresh channel between them."""
        worker = self._workers[index]
        if worker.control is None:
            return
        thread_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(worker.control, [CONTROL.pack(CONTROL_ADD_CHANNEL, thread.index)], [worker_end.fileno()])
        except OSError as error:
            log.warning("worker %d: cannot pass a channel for I/O thread %d: %s", index, thread.index, error)
            thread_end.close()
            return
        finally:
            worker_end.close()
        thread.post("add_channel", index, thread_end)

    def reap(self, threads: tuple[IOThread, ...]) -> None:
        """Restart workers that exited; call periodically from the supervisor."""
        now = time.monotonic()
        for worker in self._workers:
            process = worker.process
            if process is not None and process.poll() is not None:
                log.error(
                    "worker %d (pid %d) exited with status %s; restarting it",
                    worker.index, process.pid, process.returncode,
                )  # fmt: skip
                if worker.control is not None:
                    worker.control.close()
                    worker.control = None
                worker.process = None
                worker.restarts += 1
                early = now - worker.started < RESTART_BACKOFF_SECONDS
                worker.restart_at = now + (RESTART_BACKOFF_SECONDS if early else 0.0)
            if worker.process is None and now >= worker.restart_at:
                self._spawn(worker, threads)

    def replace(self, index: int, reason: str) -> None:
        """Kill worker ``index`` (``reason`` is logged); :meth:`reap` restarts it with fresh channels."""
        process = self._workers[index].process
        if process is not None and process.poll() is None:
            log.error("worker %d (pid %d): %s; killing it to start a fresh one", index, process.pid, reason)
            process.kill()

    def statistics(self) -> list[WorkerStatistics]:
        now = time.monotonic()
        return [
            WorkerStatistics(
                index=worker.index,
                pid=worker.process.pid if worker.process else 0,
                alive=worker.process is not None and worker.process.poll() is None,
                restarts=worker.restarts,
                uptime=round(now - worker.started, 3) if worker.process else 0.0,
            )
            for worker in self._workers
        ]

    def stop(self, timeout: float) -> None:
        """Ask every worker to stop, wait up to ``timeout`` s, then kill the rest."""
        for worker in self._workers:
            if worker.control is not None:
                with contextlib.suppress(OSError):
                    worker.control.send(CONTROL.pack(CONTROL_STOP, 0))
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d (pid %d) did not stop in %.1fs; killing it", worker.index, process.pid, timeout)
                process.kill()
                process.wait()
            if worker.control is not None:
                worker.control.close()
                worker.control = None
            worker.process = None
