"""The transport's answers to control requests: health, threads, stats, connections, close, calls.

One layer of :class:`~sipwire.transport.server.TransportServer` (its state is
declared here, set by the server): the control socket's thread calls
:meth:`ControlOps.handle_control`, which reads the I/O threads through their
inboxes (a snapshot job per thread, answered through a future) and never
touches a thread's state directly. Answers are plain dicts for JSON.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Final

from sipwire.config import Settings
from sipwire.errors import ControlError
from sipwire.transport.capturequery import CaptureQuery
from sipwire.transport.connection import ConnectionInfo
from sipwire.transport.hub import Hub
from sipwire.transport.iometrics import ThreadStatistics
from sipwire.transport.iothread import IOThread
from sipwire.transport.statsblock import HANDSHAKE_BUCKETS_MS, Histogram, histogram_view
from sipwire.transport.workerpool import WorkerPool

if TYPE_CHECKING:
    from sipwire.otel.pipeline import Telemetry

#: How long a control request waits for the I/O threads to answer.
SNAPSHOT_TIMEOUT_SECONDS: Final = 2.0


class ControlOps:
    """Control requests answered from the server's state; see the module docstring."""

    settings: Settings
    hub: Hub[IOThread]
    workers: WorkerPool
    listening: dict[str, str]
    started_at: float
    telemetry: Telemetry | None
    _desired_threads: int
    _retired: list[IOThread]
    _retired_counters: dict[str, int]
    _retired_lock: threading.Lock
    _captured: CaptureQuery | None
    resize: Callable[[int], None]  # the server's: the ``threads`` op with a size

    def snapshot(
        self, with_connections: bool, threads: tuple[IOThread, ...] | None = None
    ) -> tuple[list[ThreadStatistics], list[ConnectionInfo]]:
        """Ask every active thread (or ``threads``) for its statistics (and connections) and wait for all."""
        futures: list[Future[tuple[ThreadStatistics, list[ConnectionInfo]]]] = []
        for thread in self.hub.threads if threads is None else threads:
            future: Future[tuple[ThreadStatistics, list[ConnectionInfo]]] = Future()
            thread.post("snapshot", future, with_connections)
            futures.append(future)
        stats: list[ThreadStatistics] = []
        connections: list[ConnectionInfo] = []
        try:
            for future in futures:
                thread_stats, infos = future.result(SNAPSHOT_TIMEOUT_SECONDS)
                stats.append(thread_stats)
                connections.extend(infos)
        except FutureTimeout:
            raise ControlError(f"an I/O thread did not answer within {SNAPSHOT_TIMEOUT_SECONDS}s") from None
        return stats, connections

    def close_connection(self, conn_id: int) -> bool:
        owner = self.hub.owner(conn_id)
        if owner is None:
            return False
        future: Future[bool] = Future()
        owner.post("close_connection", conn_id, future)
        try:
            return future.result(SNAPSHOT_TIMEOUT_SECONDS)
        except FutureTimeout:
            raise ControlError(
                f"closing connection {conn_id} did not finish within {SNAPSHOT_TIMEOUT_SECONDS}s"
            ) from None

    def threads_state(self) -> dict[str, Any]:
        stats, _ = self.snapshot(with_connections=False)
        return {
            "size": len(stats),
            "wanted": self._desired_threads,
            "max": self.settings.max_threads,
            "threads": [
                {
                    "index": s.index,
                    "connections": s.connections,
                    "load": s.load,
                    "queue_depth": s.queue_depth,
                    "jobs": s.jobs,
                    "loop_lag_ms": s.loop_lag_ms,
                }
                for s in stats
            ],
        }

    def statistics(self) -> dict[str, Any]:
        with self._retired_lock:
            active = self.hub.threads
            counters = dict(self._retired_counters)
            for retiring in self._retired:
                # Still draining: read its counters directly (a dict copy is atomic under the GIL).
                for name, value in dict(retiring.counters).items():
                    counters[name] = counters.get(name, 0) + value
        stats, _ = self.snapshot(with_connections=False, threads=active)
        for thread_stats in stats:
            for name, value in thread_stats.counters.items():
                counters[name] = counters.get(name, 0) + value
        if self.telemetry is not None:
            counters.update(self.telemetry.counters())
        handshakes = [sum(column) for column in zip(*(s.handshake_buckets for s in stats), strict=True)]
        upgrades = [sum(column) for column in zip(*(s.ws_handshake_buckets for s in stats), strict=True)]
        in_flight = [sum(s.outstanding[index] for s in stats) for index in range(len(self.workers))]
        workers = [dataclasses.asdict(w) | {"in_flight": in_flight[w.index]} for w in self.workers.statistics()]
        return {
            "connections": sum(s.connections for s in stats),
            "max_connections": self.settings.max_connections,
            "pending_write_bytes": sum(s.pending_write_bytes for s in stats),
            "queue_depth": sum(s.queue_depth for s in stats),
            "dispatch_in_flight": sum(in_flight),
            "counters": dict(sorted(counters.items())),
            "tls_handshake_ms": histogram_view(
                Histogram("tls_handshake_ms", HANDSHAKE_BUCKETS_MS, tuple(handshakes), sum(handshakes), 0.0)
            ),
            "ws_handshake_ms": histogram_view(
                Histogram("ws_handshake_ms", HANDSHAKE_BUCKETS_MS, tuple(upgrades), sum(upgrades), 0.0)
            ),
            "workers": workers,
            "threads": [dataclasses.asdict(s) for s in stats],
            "telemetry": self.telemetry.statistics() if self.telemetry is not None else None,
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "up",
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "started_at": self.started_at,
            "listening": self.listening,
            "threads": len(self.hub.threads),
            "workers": len(self.workers),
            "instance": self.settings.instance,
        }

    def handle_control(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        if op == "health":
            return self.health()
        if op == "threads":
            if "size" in request:
                self.resize(_int_argument(request, "size"))
            return self.threads_state()
        if op == "stats":
            return self.statistics()
        if op == "connections":
            return self._connections(request)
        if op == "connection":
            conn_id = _int_argument(request, "id")
            _, infos = self.snapshot(with_connections=True)
            for info in infos:
                if info.id == conn_id:
                    return info.as_dict()
            raise ControlError(f"no open connection with id {conn_id}")
        if op == "close":
            conn_id = _int_argument(request, "id")
            if not self.close_connection(conn_id):
                raise ControlError(f"no open connection with id {conn_id}")
            return {"closed": conn_id}
        if op in ("calls", "call"):
            if self._captured is None:
                raise ControlError("the capture is off (setting capture): no calls to show")
            return self._captured.calls(request) if op == "calls" else self._captured.call(request)
        raise ControlError(
            f"unknown op {op!r}: use health, threads, stats, connections, connection, close, calls or call"
        )

    def _connections(self, request: dict[str, Any]) -> dict[str, Any]:
        limit = _int_argument(request, "limit") if "limit" in request else 1000
        if limit < 1:
            raise ControlError(f"limit {limit} must be at least 1")
        state = request.get("state")
        transport = request.get("transport")
        _, infos = self.snapshot(with_connections=True)
        selected = [
            info for info in infos
            if (state is None or info.state == state) and (transport is None or info.transport == transport)
        ]  # fmt: skip
        selected.sort(key=lambda info: info.id)
        return {"total": len(selected), "connections": [info.as_dict() for info in selected[:limit]]}


def _int_argument(request: dict[str, Any], name: str) -> int:
    value = request.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"{name} must be an integer, got {value!r}")
    return value
