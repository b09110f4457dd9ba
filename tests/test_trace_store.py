"""The console's trace store: assembly in any order, capacity in spans, tail-policy eviction, retention, state."""

from __future__ import annotations

import threading
import time

import pytest

from sipwire.console.tracestore import ASSEMBLY_SECONDS, MAX_SPANS_PER_TRACE, Span, TraceStore


def span(
    trace: int, span_id: int, parent: int = 0, *, duration_ms: float = 1.0, status: str = "unset", service: str = "t"
) -> Span:
    start = 1_000_000_000 + span_id * 1000
    return Span(
        f"{trace:032x}", f"{span_id:016x}", f"{parent:016x}" if parent else "", f"span-{span_id}", "internal",
        service, start, start + int(duration_ms * 1e6), status, "", (),
    )  # fmt: skip


def three(trace: int, *, duration_ms: float = 1.0, status: str = "unset") -> list[Span]:
    """A message's trace as sipwire makes it: receive (transport), route (worker), write (transport)."""
    base = trace * 10
    return [
        span(trace, base + 1, duration_ms=duration_ms),
        span(trace, base + 2, base + 1, service="w", status=status),
        span(trace, base + 3, base + 2),
    ]


def test_spans_of_one_trace_join_in_any_order_and_from_any_sender() -> None:
    store = TraceStore(capacity=100, retention=0)
    receive, route, write = three(7)
    store.add([write])  # the child first, as another exporter might send it
    store.add([span(8, 81)])
    store.add([receive, route])
    trace = store.get(f"{7:032x}")
    assert trace is not None
    assert {s.name for s in trace.spans} == {"span-71", "span-72", "span-73"}
    assert trace.services == ["t", "w"] and trace.root.span_id == receive.span_id
    assert [s["span"].span_id for s in trace.waterfall()] == [receive.span_id, route.span_id, write.span_id]
    assert store.get(f"{7:032X}") is not None  # ids are case-insensitive


def test_capacity_is_in_spans_and_the_tail_policy_evicts_fast_successful_traces_first() -> None:
    store = TraceStore(capacity=12, retention=0, slow_ms=50)
    store.add(three(1, status="error"))  # failed: kept longest
    store.add(three(2, duration_ms=80))  # slow
    store.add(three(3))  # fast and successful
    store.add(three(4))
    assert store.figures()["spans"] == 12 and store.traces_evicted == 0
    store.add(three(5))  # 15 spans: one trace must go, the oldest fast one
    assert store.get(f"{3:032x}") is None
    assert all(store.get(f"{n:032x}") is not None for n in (1, 2, 4, 5))
    store.add(three(6) + three(7))  # two more go: the fast ones, oldest first (4, then 5)
    assert [n for n in range(1, 8) if store.get(f"{n:032x}")] == [1, 2, 6, 7]
    store.add(three(8) + three(9))  # 6 and 7 are fast; they go before the slow and the failed
    assert [n for n in range(1, 10) if store.get(f"{n:032x}")] == [1, 2, 8, 9]
    store.add([span(10, 101, duration_ms=80)] + [span(10, 100 + i, 101) for i in range(2, 10)])  # 9 spans, slow
    # Room for 9 more: fast 8 and 9 go first, then the slow trace 2; the failed one stays.
    assert [n for n in range(1, 11) if store.get(f"{n:032x}")] == [1, 10]
    figures = store.figures()
    assert figures["spans"] == 12
    assert figures["evicted"] == {"fast": 7, "slow": 1, "error": 0, "pinned": 0}
    assert figures["spans_evicted"] == {"fast": 21, "slow": 3, "error": 0, "pinned": 0}


def test_a_span_that_fails_or_slows_a_trace_moves_it_to_a_later_class() -> None:
    store = TraceStore(capacity=6, retention=0, slow_ms=50)
    first, second = three(1), three(2)
    store.add(first[:2])
    store.add(second)
    store.add([span(1, 13, 12, status="error")])  # trace 1 fails only with its last span
    store.add(three(3))  # 9 spans: trace 2 (fast) goes, not the older trace 1
    assert store.get(f"{1:032x}") is not None and store.get(f"{2:032x}") is None
    assert store.figures()["evicted"]["fast"] == 1


def test_a_listed_trace_stays_retrievable_for_the_retention_under_load() -> None:
    store = TraceStore(capacity=300, retention=0.6)
    store.add(three(1))
    [listed] = store.recent(1)
    assert listed.trace_id == f"{1:032x}"
    for number in range(2, 400):  # far more than the capacity, all fast and successful
        store.add(three(number))
    assert store.get(listed.trace_id) is not None  # pinned: eviction skips it
    assert store.get(f"{2:032x}") is None
    time.sleep(0.7)
    store.add(three(400))  # the pin has expired: it is the oldest fast trace now
    assert store.get(listed.trace_id) is None
    assert store.figures()["evicted"]["pinned"] == 0


def test_pinned_traces_hold_at_most_half_the_capacity() -> None:
    store = TraceStore(capacity=12, retention=60)
    for number in range(1, 5):
        store.add(three(number))
    store.recent(4)  # 12 spans listed: only 6 (two traces) may be pinned
    figures = store.figures()
    assert figures["pinned"] == 2 and figures["pins_refused"] == 2
    store.add(three(5) + three(6))
    # The two newest listed (4, 3) were pinned and stay; the other two listed went first.
    assert [n for n in range(1, 7) if store.get(f"{n:032x}")] == [3, 4, 5, 6]


def test_only_pinned_left_then_a_pinned_trace_goes_and_is_counted() -> None:
    store = TraceStore(capacity=100, retention=60)
    store.add(three(1))
    store.recent(1)
    store.add([span(2, 20 + i) for i in range(90)])
    store.add([span(1, 100 + i, 11) for i in range(95)])  # the pinned trace grows: 2 (fast) goes first
    assert store.get(f"{2:032x}") is None and store.get(f"{1:032x}") is not None
    store.add([span(1, 300 + i, 11) for i in range(5)])  # 103 spans and nothing unpinned left
    assert len(store) == 0
    assert store.figures()["evicted"] == {"fast": 1, "slow": 0, "error": 0, "pinned": 1}


def test_state_assembling_then_complete_or_incomplete(monkeypatch: pytest.MonkeyPatch) -> None:
    store = TraceStore(capacity=100, retention=0)
    receive, route, write = three(1)
    store.add([route, write])  # the root has not arrived
    store.add(three(2))
    trace = store.get(f"{1:032x}")
    assert trace is not None and trace.state() == "assembling"
    later = time.time() + ASSEMBLY_SECONDS + 0.1
    assert trace.state(later) == "incomplete"  # quiet, but no root: a span was lost on the way
    store.add([receive])
    trace = store.get(f"{1:032x}")
    assert trace is not None and trace.state() == "assembling"  # the last span just came
    assert trace.state(time.time() + ASSEMBLY_SECONDS + 0.1) == "complete"
    orphan = store.get(f"{2:032x}")
    assert orphan is not None and orphan.state(later) == "complete"
    store.add([span(2, 29, 28)])  # a span whose parent never comes
    orphan = store.get(f"{2:032x}")
    assert orphan is not None and orphan.state(time.time() + ASSEMBLY_SECONDS + 0.1) == "incomplete"


def test_one_trace_keeps_at_most_its_maximum() -> None:
    store = TraceStore(capacity=10_000, retention=0)
    rejected = store.add(span(1, i + 1) for i in range(MAX_SPANS_PER_TRACE + 5))
    assert rejected == 5 and store.spans_dropped == 5
    assert store.figures()["spans"] == MAX_SPANS_PER_TRACE


def test_concurrent_adds_and_lists_keep_the_books_balanced() -> None:
    store = TraceStore(capacity=600, retention=0.05)

    def sender(offset: int) -> None:
        for number in range(offset, offset + 500):
            store.add(three(number))
            if number % 10 == 0:
                store.recent(20)

    threads = [threading.Thread(target=sender, args=(k * 1000 + 1,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    figures = store.figures()
    held = sum(len(t.spans) for t in store.recent(10_000, pin=False))
    assert figures["spans"] == held <= 600
    assert held + sum(figures["spans_evicted"].values()) == store.spans_received == 4 * 500 * 3
