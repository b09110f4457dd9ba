"""A background sampler: the console's short memory of the transport's figures.

One thread asks the data source for ``stats`` every :data:`SAMPLE_SECONDS`
and keeps the last :data:`HISTORY_SAMPLES` samples in a bounded deque. Pages
read the latest sample instead of asking the transport themselves, so an
open dashboard (or ten) costs the transport one ``stats`` request a second,
no more. Rates (messages and errors per second) are counter deltas between
consecutive samples; a counter that went down means the transport
restarted, and that interval counts as zero rather than negative.

The same loop notices a transport going down and coming back (the data
source records it), so "down for 12 s" and the recovery need no visitor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from sipwire.console.source import TransportDownError, TransportRefusedError, TransportSource
from sipwire.transport.wire import TRANSPORTS

log = logging.getLogger("sipwire.console")

SAMPLE_SECONDS: Final = 1.0
#: Five minutes at one sample a second: enough for a sparkline, small enough to keep (a few hundred KB).
HISTORY_SAMPLES: Final = 300
#: Without a stats block, per-transport counts cost the control socket a full snapshot: refresh them less often.
PROTO_COUNT_EVERY: Final = 5

#: Counter name prefixes (and whole names) that count as errors on the overview.
ERROR_PREFIXES: Final = (
    "framing_error.",
    "tls_handshake_failed.",
    "connect_failed.",
    "accept_failed.",
    "refused.",
    "limited.",
    "lost_messages",
    "overload_rejected",
    "closed_send_timeout",
    "router_errors",
    "sip_parse_error.",
    "ws_handshake_failed.",
    "ws_close.",
    "closed_ws_ping_timeout",
)


def error_total(counters: Mapping[str, int]) -> int:
    """Errors of every kind: failed framing, handshakes, connects, accepts, lost messages, failed writes."""
    total = 0
    for name, value in counters.items():
        if name.startswith(ERROR_PREFIXES) or (name.startswith("write.") and name != "write.sent"):
            total += value
    return total


@dataclass(frozen=True, slots=True)
class Sample:
    """The figures of one moment (wall time ``at``); ``up`` False means the transport did not answer."""

    at: float
    up: bool
    stats: Mapping[str, Any] = field(default_factory=dict)
    health: Mapping[str, Any] = field(default_factory=dict)
    by_proto: Mapping[str, int] = field(default_factory=dict)
    messages_per_second: float = 0.0
    errors_per_second: float = 0.0

    @property
    def connections(self) -> int:
        return int(self.stats.get("connections", 0))

    @property
    def queue_depth(self) -> int:
        return int(self.stats.get("queue_depth", 0))

    @property
    def dispatch_in_flight(self) -> int:
        return int(self.stats.get("dispatch_in_flight", 0))

    @property
    def pending_write_bytes(self) -> int:
        return int(self.stats.get("pending_write_bytes", 0))


class History:
    """The sampler thread and its bounded ring of :class:`Sample`; thread-safe readers."""

    def __init__(self, source: TransportSource, interval: float = SAMPLE_SECONDS) -> None:
        self.source = source
        self.interval = interval
        self._samples: deque[Sample] = deque(maxlen=HISTORY_SAMPLES)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._by_proto: dict[str, int] = {}
        self._ticks = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sipwire-console-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=CONTROL_JOIN_SECONDS)
            self._thread = None

    def refresh(self) -> None:
        """Take a sample now (after a resize or a close, so the next page shows it)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._wake.wait(self.interval)
            self._wake.clear()

    def sample_once(self) -> Sample:
        now = time.time()
        try:
            health = self.source.health()
            stats = self.source.stats()
        except (TransportDownError, TransportRefusedError) as error:
            sample = Sample(at=now, up=False)
            log.debug("sample: transport not available: %s", error)
            self._by_proto = {}
        else:
            self._by_proto = self._proto_counts(stats)
            previous = self.latest()
            messages, errors = 0.0, 0.0
            if previous is not None and previous.up and now > previous.at:
                elapsed = now - previous.at
                messages = _rate(previous.stats, stats, _messages, elapsed)
                errors = _rate(previous.stats, stats, _errors, elapsed)
            sample = Sample(now, True, stats, health, dict(self._by_proto), messages, errors)
        self._ticks += 1
        with self._lock:
            self._samples.append(sample)
        return sample

    def _proto_counts(self, stats: Mapping[str, Any]) -> dict[str, int]:
        if not stats.get("connections"):
            return dict.fromkeys(TRANSPORTS, 0)
        expensive_ok = self._ticks % PROTO_COUNT_EVERY == 0 or not self._by_proto
        try:
            counts = self.source.proto_counts(allow_control=expensive_ok)
        except (TransportDownError, TransportRefusedError):
            return {}
        return self._by_proto if counts is None else counts

    def latest(self) -> Sample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def samples(self, last: int = HISTORY_SAMPLES) -> list[Sample]:
        with self._lock:
            items = list(self._samples)
        return items[-last:]


#: How long stopping waits for the sampler (it may be inside one control request).
CONTROL_JOIN_SECONDS: Final = 5.0


def _messages(stats: Mapping[str, Any]) -> int:
    return int(stats.get("counters", {}).get("messages_in", 0))


def _errors(stats: Mapping[str, Any]) -> int:
    return error_total(stats.get("counters", {}))


def _rate(before: Mapping[str, Any], after: Mapping[str, Any], figure: Any, elapsed: float) -> float:
    delta = figure(after) - figure(before)
    return round(delta / elapsed, 2) if delta > 0 else 0.0


def sparkline(values: Iterable[float], width: int = 240, height: int = 36) -> str:
    """SVG polyline points for ``values`` scaled into ``width`` x ``height`` (top is the maximum)."""
    items = list(values)
    if not items:
        return ""
    top = max(*items, 1e-9)
    step = width / max(len(items) - 1, 1)
    return " ".join(f"{i * step:.1f},{height - (v / top) * (height - 2) - 1:.1f}" for i, v in enumerate(items))
