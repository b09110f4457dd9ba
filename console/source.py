"""The one module through which the console reads (and changes) the transport.

Reads go to the transport's shared-memory stats block when it exists and
its writer is live (``transport.statsblock``): a reader never blocks the
transport, and 10,000 connections cost a memory copy rather than a snapshot
by every I/O thread. Without a live block they go to the control socket.
Changes (resize, close) and health always go to the control socket.

The source also remembers whether the transport answered the last time it
was asked, since when it is up or down, and which pid it had, so pages can
say "down for 12 s" and notice a restart. A new :class:`ControlClient` is
opened per request (a Unix socket connect costs microseconds), so a
transport that comes back is picked up by the next request with no reconnect
logic here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sipwire.config import Settings
from sipwire.errors import ControlError
from sipwire.transport.control import ControlClient
from sipwire.transport.wire import TRANSPORTS

#: Seconds one control request may take before the transport counts as down.
CONTROL_TIMEOUT_SECONDS: Final = 3.0
#: Seconds a capture query (ops ``calls``, ``call``) may take: the first one summarizes the whole ring
#: (seconds at 200,000 messages). Past it the query fails with :class:`CaptureSlowError`; the transport
#: is not counted down for it.
CAPTURE_TIMEOUT_SECONDS: Final = 30.0
#: How long a full connection list is reused by other readers (pages polling at 10,000 connections).
CONNECTIONS_CACHE_SECONDS: Final = 1.0
#: Connection records read from the stats block are reused this long. The I/O threads rewrite
#: their slots every 0.25 s, so this loses no freshness, and at 10,000 connections one read of
#: every slot is most of a request's time (bench/consolebench.py).
RECORDS_CACHE_SECONDS: Final = 0.2
#: Seconds between attempts to attach the stats block while it is missing.
BLOCK_RETRY_SECONDS: Final = 2.0

T = TypeVar("T")


class TransportDownError(ControlError):
    """The transport does not answer: not running, another instance, or stuck; the message says which."""


class TransportRefusedError(ControlError):
    """The transport answered but refused the request (unknown connection id, bad size...)."""


class CaptureSlowError(ControlError):
    """A capture query did not answer within :data:`CAPTURE_TIMEOUT_SECONDS`; the transport is not counted down."""


@dataclass(frozen=True, slots=True)
class Liveness:
    """What the console last learnt about the transport."""

    up: bool
    since: float  # wall time of the last change between up and down (console start if never seen)
    pid: int | None  # pid of the transport last seen up
    error: str  # why it counts as down ("" when up)
    restarts_seen: int  # how many times a new pid appeared

    def for_seconds(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.since)


class TransportSource:
    """Reads figures from the transport and forwards admin requests; thread-safe."""

    def __init__(self, settings: Settings, use_stats_block: bool = True) -> None:
        self.settings = settings
        self._use_block = use_stats_block
        self._lock = threading.Lock()
        self._liveness = Liveness(False, time.time(), None, "not contacted yet", 0)
        self._block: Any = None  # transport.statsblock.StatsReader once attached
        self._block_checked = 0.0
        self._connections_cache: tuple[float, dict[str, Any]] | None = None
        self._records_cache: tuple[float, Any, list[Any]] | None = None  # (time, reader, records)

    # -- liveness ---------------------------------------------------------------------------------

    def liveness(self) -> Liveness:
        with self._lock:
            return self._liveness

    def _mark_up(self, pid: int | None = None) -> None:
        with self._lock:
            old = self._liveness
            new_pid = pid if pid is not None else old.pid
            restarted = pid is not None and old.pid is not None and pid != old.pid
            since = old.since if old.up and not restarted else time.time()
            self._liveness = Liveness(True, since, new_pid, "", old.restarts_seen + int(restarted))
            if restarted:
                self._connections_cache = None
                self._records_cache = None

    def _mark_down(self, error: str) -> None:
        with self._lock:
            old = self._liveness
            since = old.since if not old.up else time.time()
            self._liveness = Liveness(False, since, old.pid, error, old.restarts_seen)
            self._connections_cache = None
            self._records_cache = None

    @property
    def reads_from(self) -> str:
        """Where figures come from right now, for the pages: "stats block" or "control socket"."""
        return "stats block" if self._block is not None else "control socket"

    # -- control socket ---------------------------------------------------------------------------

    def _control(self, op: str, capture: bool = False, **arguments: Any) -> Any:
        """One control request; ``capture``: a capture query, allowed longer, and no sign of a transport down."""
        timeout = CAPTURE_TIMEOUT_SECONDS if capture else CONTROL_TIMEOUT_SECONDS
        try:
            client = ControlClient(self.settings.control_path, timeout=timeout)
        except ControlError as error:
            self._mark_down(str(error))
            raise TransportDownError(str(error)) from error
        try:
            with client:
                result = client.request(op, **arguments)
        except ControlError as error:
            if capture and isinstance(error.__cause__, TimeoutError):
                raise CaptureSlowError(
                    f"the transport's capture took more than {timeout:g} s to answer {op!r}"
                ) from error
            if isinstance(error.__cause__, OSError) or "closed the control connection" in str(error):
                self._mark_down(str(error))
                raise TransportDownError(str(error)) from error
            self._mark_up()
            raise TransportRefusedError(str(error)) from error
        except ValueError as error:  # a garbled answer: treat like a transport that went away mid-answer
            self._mark_down(f"unreadable answer to {op!r}: {error}")
            raise TransportDownError(f"unreadable answer to {op!r} from the transport") from error
        self._mark_up(result.get("pid") if op == "health" and isinstance(result, dict) else None)
        return result

    # -- stats block ------------------------------------------------------------------------------

    def _reader(self) -> Any:
        """The attached stats block reader if it is usable now, else None (then the control socket serves)."""
        if not self._use_block:
            return None
        try:
            from sipwire.transport import statsblock  # noqa: PLC0415 - optional: older transports have no block
        except ImportError:
            self._use_block = False
            return None
        with self._lock:
            reader = self._block
            if reader is None:
                now = time.monotonic()
                if now - self._block_checked < BLOCK_RETRY_SECONDS:
                    return None
                self._block_checked = now
                try:
                    reader = statsblock.StatsReader.for_settings(self.settings)
                except (statsblock.StatsError, OSError, ValueError):
                    return None
                self._block = reader
        try:
            reader.require_live()
        except (statsblock.StatsError, OSError, ValueError):
            self._drop_reader(reader)
            return None
        return reader

    def _drop_reader(self, reader: Any) -> None:
        with self._lock:
            if self._block is reader:
                self._block = None
                self._block_checked = time.monotonic()
        with contextlib.suppress(Exception):
            reader.close()

    def _from_block(self, read: Callable[[Any], T]) -> T | None:
        reader = self._reader()
        if reader is None:
            return None
        from sipwire.transport import statsblock  # noqa: PLC0415

        try:
            value = read(reader)
        except (statsblock.StatsError, OSError, ValueError, IndexError):
            self._drop_reader(reader)
            return None
        self._mark_up(reader.header().writer_pid)
        return value

    def close(self) -> None:
        with self._lock:
            reader, self._block = self._block, None
        if reader is not None:
            with contextlib.suppress(Exception):
                reader.close()

    # -- reads -------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._control("health")
        return result

    def threads(self) -> dict[str, Any]:
        result: dict[str, Any] = self._control("threads")
        return result

    def stats(self) -> dict[str, Any]:
        from_block = self._from_block(_block_stats)
        if from_block is not None:
            return from_block
        result: dict[str, Any] = self._control("stats")
        return result

    def connections(
        self, state: str | None = None, transport: str | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """``{"total", "connections"}`` sorted by id; ``limit=None`` means all (cached briefly)."""
        if limit is None:
            everything = self._all_connections()
            selected = [
                c
                for c in everything["connections"]
                if (state is None or c["state"] == state) and (transport is None or c["transport"] == transport)
            ]
            return {"total": len(selected), "connections": selected}
        from_block = self._from_block(lambda reader: _block_connections(self._records(reader), state, transport, limit))
        if from_block is not None:
            return from_block
        request: dict[str, Any] = {"limit": limit}
        if state:
            request["state"] = state
        if transport:
            request["transport"] = transport
        result: dict[str, Any] = self._control("connections", **request)
        return result

    def proto_counts(self, allow_control: bool = True) -> dict[str, int] | None:
        """Open connections by transport: a count over the stats block, else (if allowed) one control request each."""
        counted = self._from_block(_block_proto_counts)
        if counted is not None or not allow_control:
            return counted
        return {proto: int(self.connections(transport=proto, limit=1)["total"]) for proto in TRANSPORTS}

    def _all_connections(self) -> dict[str, Any]:
        with self._lock:
            cached = self._connections_cache
        if cached is not None and time.monotonic() - cached[0] < CONNECTIONS_CACHE_SECONDS:
            return cached[1]
        limit = max(self.settings.max_connections, 1)
        result = self._from_block(lambda reader: _block_connections(self._records(reader), None, None, limit))
        if result is None:
            result = self._control("connections", limit=limit)
        with self._lock:
            self._connections_cache = (time.monotonic(), result)
        return result

    def _records(self, reader: Any) -> list[Any]:
        """Every connection record of the stats block, reused for RECORDS_CACHE_SECONDS."""
        with self._lock:
            cached = self._records_cache
        now = time.monotonic()
        if cached is not None and cached[1] is reader and now - cached[0] < RECORDS_CACHE_SECONDS:
            records: list[Any] = cached[2]
            return records
        records = reader.connections()
        with self._lock:
            self._records_cache = (now, reader, records)
        return records

    def connection(self, conn_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self._control("connection", id=conn_id)
        return result

    def calls(self, **filters: Any) -> dict[str, Any]:
        """Calls in the transport's capture ring, filtered there (:mod:`transport.capturequery`)."""
        result: dict[str, Any] = self._control("calls", True, **filters)
        return result

    def call(self, call_id: str) -> dict[str, Any] | None:
        """One captured call with its messages' text, or None when the capture holds no such Call-ID."""
        result: dict[str, Any] | None = self._control("call", True, call_id=call_id)
        return result

    # -- changes (always the control socket) --------------------------------------------------------

    def resize(self, size: int) -> dict[str, Any]:
        result: dict[str, Any] = self._control("threads", size=size)
        return result

    def close_connection(self, conn_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self._control("close", id=conn_id)
        with self._lock:
            self._connections_cache = None
            self._records_cache = None
        return result


def _block_stats(reader: Any) -> dict[str, Any]:
    from sipwire.transport import statsblock  # noqa: PLC0415

    view: dict[str, Any] = statsblock.stats_view(reader)
    return view


def _block_proto_counts(reader: Any) -> dict[str, int]:
    counts = dict.fromkeys(TRANSPORTS, 0)
    for record in reader.connections():
        counts[record.transport] = counts.get(record.transport, 0) + 1
    return counts


def _block_connections(records: list[Any], state: str | None, transport: str | None, limit: int) -> dict[str, Any]:
    from sipwire.transport import statsblock  # noqa: PLC0415

    view: dict[str, Any] = statsblock.connections_view(records, state, transport, limit)
    return view
