"""The console's trace store: spans assembled into traces, bounded in spans, evicted by a tail policy.

Assembly
    Spans are joined by trace id whatever their order and whichever process
    sent them; a child may arrive before its parent. A trace's *state* is

    ``assembling``  its last span arrived less than :data:`ASSEMBLY_SECONDS` ago:
                    more may come (the transport's exporter sends a batch at most
                    ``OTEL_BSP_SCHEDULE_DELAY`` after its first span, 0.5 s by default);
    ``incomplete``  quiet since, but it has no root span, or a span names a parent
                    the store never got (a span dropped on the way, or evicted);
    ``complete``    quiet, one tree from its root.

Capacity and eviction
    The store holds at most ``capacity`` spans (one trace at most
    :data:`MAX_SPANS_PER_TRACE`). To make room it evicts whole traces, tail
    policy: fast successful traces first, then slow ones (lasting at least
    ``slow_ms``), failed ones (a span with status error) last; oldest first
    within each class. What it evicted is counted by that reason
    (``fast``, ``slow``, ``error``) in traces and in spans.

Retention
    A trace shown in the list (:meth:`TraceStore.recent`: the Traces page and
    ``GET /api/traces``) is *pinned* for ``retention`` seconds: eviction
    skips it, so what an operator saw stays retrievable however fast spans
    arrive. Pinned traces may hold at most half the capacity; a listed trace
    beyond that is not pinned (counted in ``pins_refused``), and only when
    nothing unpinned is left is a pinned trace evicted (reason ``pinned``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

#: Spans kept per trace: a message's trace has a handful; this only stops a pathological one.
MAX_SPANS_PER_TRACE: Final = 512
#: A trace whose last span arrived less than this many seconds ago is still assembling.
ASSEMBLY_SECONDS: Final = 2.0
#: Eviction classes, in the order the tail policy empties them.
CLASSES: Final = ("fast", "slow", "error")


@dataclass(frozen=True, slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    service: str
    start_ns: int
    end_ns: int
    status: str
    status_message: str
    attributes: tuple[tuple[str, str], ...]

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6


@dataclass(slots=True)
class Trace:
    trace_id: str
    received_at: float
    spans: list[Span] = field(default_factory=list)
    #: When its last span arrived (UNIX seconds).
    last_at: float = 0.0
    #: Eviction class (:data:`CLASSES`) and, while pinned, until when.
    kind: str = "fast"
    pinned_until: float = 0.0

    @property
    def start_ns(self) -> int:
        return min(s.start_ns for s in self.spans)

    @property
    def end_ns(self) -> int:
        return max(s.end_ns for s in self.spans)

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    @property
    def root(self) -> Span:
        ids = {s.span_id for s in self.spans}
        roots = [s for s in self.spans if not s.parent_id or s.parent_id not in ids]
        return min(roots or self.spans, key=lambda s: s.start_ns)

    @property
    def services(self) -> list[str]:
        return sorted({s.service for s in self.spans})

    @property
    def has_error(self) -> bool:
        return any(s.status == "error" for s in self.spans)

    def state(self, now: float | None = None) -> str:
        """``assembling``, ``incomplete`` or ``complete``: see the module docstring."""
        if (time.time() if now is None else now) - self.last_at < ASSEMBLY_SECONDS:
            return "assembling"
        ids = {s.span_id for s in self.spans}
        whole = any(not s.parent_id for s in self.spans) and all(
            not s.parent_id or s.parent_id in ids for s in self.spans
        )
        return "complete" if whole else "incomplete"

    def copy(self) -> Trace:
        return Trace(self.trace_id, self.received_at, list(self.spans), self.last_at, self.kind, self.pinned_until)

    def waterfall(self) -> list[dict[str, Any]]:
        """Spans in tree order (children after their parent, by start), with depth and % offsets."""
        start, total = self.start_ns, max(self.end_ns - self.start_ns, 1)
        ids = {s.span_id for s in self.spans}
        children: dict[str, list[Span]] = {}
        for span in self.spans:
            parent = span.parent_id if span.parent_id in ids else ""
            children.setdefault(parent, []).append(span)
        rows: list[dict[str, Any]] = []
        stack: list[tuple[Span, int]] = [(s, 0) for s in sorted(children.get("", []), key=by_start, reverse=True)]
        while stack:
            span, depth = stack.pop()
            rows.append(
                {
                    "span": span,
                    "depth": depth,
                    "offset_pct": round(100 * (span.start_ns - start) / total, 3),
                    "width_pct": max(round(100 * (span.end_ns - span.start_ns) / total, 3), 0.3),
                    "offset_ms": round((span.start_ns - start) / 1e6, 3),
                }
            )
            stack.extend(
                (child, depth + 1) for child in sorted(children.get(span.span_id, []), key=by_start, reverse=True)
            )
        return rows


def by_start(span: Span) -> int:
    return span.start_ns


class TraceStore:
    """Traces by id, bounded in spans, evicted by the tail policy, listed traces pinned; thread-safe."""

    def __init__(self, capacity: int, retention: float = 60.0, slow_ms: float = 200.0) -> None:
        self.capacity = capacity
        self.retention = retention
        self.slow_ns = int(slow_ms * 1e6)
        self.spans_held = 0
        self.spans_received = 0
        self.spans_dropped = 0
        self.exports_received = 0
        self.exports_rejected = 0
        self.pins_refused = 0
        self.evicted: dict[str, int] = dict.fromkeys((*CLASSES, "pinned"), 0)
        self.spans_evicted: dict[str, int] = dict.fromkeys((*CLASSES, "pinned"), 0)
        self._lock = threading.Lock()
        self._all: OrderedDict[str, Trace] = OrderedDict()  # by first arrival: the list, and lookups
        self._classes: dict[str, OrderedDict[str, Trace]] = {name: OrderedDict() for name in CLASSES}
        self._pinned: OrderedDict[str, Trace] = OrderedDict()  # by pin expiry
        self._pinned_spans = 0

    @property
    def traces_evicted(self) -> int:
        return sum(self.evicted.values())

    def add(self, spans: Iterable[Span]) -> int:
        """Store ``spans``; returns how many were refused (their trace already held its maximum)."""
        rejected = 0
        now = time.time()
        with self._lock:
            self.exports_received += 1
            self._unpin_expired(now)
            for span in spans:
                self.spans_received += 1
                trace = self._all.get(span.trace_id)
                if trace is None:
                    trace = Trace(span.trace_id, now)
                    self._all[span.trace_id] = trace
                    self._classes["fast"][span.trace_id] = trace
                elif len(trace.spans) >= MAX_SPANS_PER_TRACE:
                    rejected += 1
                    continue
                trace.spans.append(span)
                trace.last_at = now
                self.spans_held += 1
                if trace.pinned_until:
                    self._pinned_spans += 1
                self._reclassify(trace, span)
            self.spans_dropped += rejected
            while self.spans_held > self.capacity and self._evict_one():
                pass
        return rejected

    def _reclassify(self, trace: Trace, span: Span) -> None:
        """Move ``trace`` to the class its new ``span`` makes it (fast -> slow -> error, never back)."""
        if trace.kind == "error":
            return
        if span.status == "error":
            kind = "error"
        elif trace.kind == "fast" and trace.end_ns - trace.start_ns >= self.slow_ns:
            kind = "slow"
        else:
            return
        if not trace.pinned_until:
            del self._classes[trace.kind][trace.trace_id]
            self._classes[kind][trace.trace_id] = trace
        trace.kind = kind

    def _evict_one(self) -> bool:
        for kind in CLASSES:
            members = self._classes[kind]
            if members:
                _, trace = members.popitem(last=False)
                self._forget(trace, kind)
                return True
        if self._pinned:
            _, trace = self._pinned.popitem(last=False)
            self._pinned_spans -= len(trace.spans)
            self._forget(trace, "pinned")
            return True
        return False

    def _forget(self, trace: Trace, reason: str) -> None:
        del self._all[trace.trace_id]
        self.spans_held -= len(trace.spans)
        self.evicted[reason] += 1
        self.spans_evicted[reason] += len(trace.spans)

    def _unpin_expired(self, now: float) -> None:
        pinned = self._pinned
        while pinned:
            trace = next(iter(pinned.values()))
            if trace.pinned_until > now:
                return
            del pinned[trace.trace_id]
            self._pinned_spans -= len(trace.spans)
            trace.pinned_until = 0.0
            members = self._classes[trace.kind]
            members[trace.trace_id] = trace
            members.move_to_end(trace.trace_id, last=False)  # older than what came while it was pinned

    def _pin(self, trace: Trace, until: float) -> None:
        if trace.pinned_until:
            del self._pinned[trace.trace_id]  # pinned again: its expiry moves to the end
        elif self._pinned_spans + len(trace.spans) > self.capacity // 2:
            self.pins_refused += 1
            return
        else:
            del self._classes[trace.kind][trace.trace_id]
            self._pinned_spans += len(trace.spans)
        trace.pinned_until = until
        self._pinned[trace.trace_id] = trace

    def recent(self, limit: int = 100, pin: bool = True) -> list[Trace]:
        """The ``limit`` newest traces (copies), newest first; ``pin``: they are being shown, keep them."""
        now = time.time()
        with self._lock:
            self._unpin_expired(now)
            traces: list[Trace] = []
            for trace in reversed(self._all.values()):
                if len(traces) == limit:
                    break
                if pin and self.retention > 0:
                    self._pin(trace, now + self.retention)
                traces.append(trace.copy())
        return traces

    def get(self, trace_id: str) -> Trace | None:
        with self._lock:
            trace = self._all.get(trace_id.lower())
            return None if trace is None else trace.copy()

    def figures(self) -> dict[str, Any]:
        """What the Traces page and ``/metrics`` show of the store."""
        with self._lock:
            return {
                "traces": len(self._all),
                "spans": self.spans_held,
                "capacity": self.capacity,
                "retention": self.retention,
                "pinned": len(self._pinned),
                "pins_refused": self.pins_refused,
                "evicted": dict(self.evicted),
                "spans_evicted": dict(self.spans_evicted),
            }

    def __len__(self) -> int:
        with self._lock:
            return len(self._all)
