"""Interop with the real sipp as SIP peer: calls over TCP, counted on both ends.

sipp drives a real ``sipwire transport`` (responder router) over loopback,
with one shared connection (``-t t1``) or a connection per call (``-t tn``).
Every run is bounded in calls and time (see ``tests/sipp.py``). Each test
checks sipp's own verdict (exit code 0, every call successful, none failed,
no unexpected message) and then that both ends counted the same traffic:
the transport's ``messages_in`` equals the requests sipp sent, its
``write.sent`` equals the 200s sipp received, and nothing was lost, refused
or answered with an error.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningTransport, run_ctl
from tests.sipp import SIPP, Sipp, SippResult, run_sipp

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.skipif(SIPP is None, reason="sipp is not on PATH (install the Debian package sip-tester)"),
]

StartTransport = Callable[..., RunningTransport]

#: Counters that must stay absent (or zero) in a clean run: anything lost, refused, failed or rejected.
BAD_COUNTER_PREFIXES = (
    "lost_messages",
    "overload_rejected",
    "framing_error.",
    "refused.",
    "accept_failed.",
    "connect_failed.",
    "closed_idle",
)
SETTLE_SECONDS = 5.0
#: Time for thread 0 to accept and hand over new connections with no control request running.
QUIET_SECONDS = 0.3


def observed_counter(counters: dict[str, int], name: str) -> int:
    """A counter's value; ``accepted`` sums its per-protocol split (``accepted.tcp``, ``accepted.tls``)."""
    if name == "accepted":
        return sum(value for key, value in counters.items() if key == name or key.startswith("accepted."))
    return counters.get(name, 0)


def settled_counters(transport: RunningTransport, expected: dict[str, int]) -> dict[str, int]:
    """The transport's counters once they reach ``expected`` (or after SETTLE_SECONDS).

    Counters are summed from per-thread snapshots; a thread that is still
    retiring after a resize reports only once it has finished, so give the
    figures a moment to settle before comparing them exactly.
    """
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        counters = transport.counters()
        settled = all(observed_counter(counters, name) == value for name, value in expected.items())
        if settled or time.monotonic() > deadline:
            return counters
        time.sleep(0.1)


def assert_clean_sipp(result: SippResult, calls: int) -> None:
    details = result.describe()
    assert result.returncode == 0, details
    assert result.created == calls, details
    assert result.successful == calls, details
    assert result.failed == 0, details
    assert result.unexpected() == 0, details
    assert result.retransmissions == 0, details


def assert_counters(transport: RunningTransport, *, messages_in: int, sent: int, accepted: int) -> dict[str, int]:
    """Exact agreement between what sipp counted and what the transport counted."""
    expected = {"messages_in": messages_in, "write.sent": sent, "accepted": accepted, "closed": accepted}
    counters = settled_counters(transport, expected)
    context = f"transport counters: {counters}\ntransport log (tail):\n{transport.log_text()[-3000:]}"
    observed = {name: observed_counter(counters, name) for name in expected}
    assert observed == expected, context
    bad = {name: value for name, value in counters.items() if name.startswith(BAD_COUNTER_PREFIXES) and value}
    assert bad == {}, context
    failed_writes = {n: v for n, v in counters.items() if n.startswith("write.") and n != "write.sent" and v}
    assert failed_writes == {}, context
    log_errors = [line for line in transport.log_text().splitlines() if " ERROR " in line or "Traceback" in line]
    assert log_errors == [], context
    return counters


def expected_accepts(mode: str, calls: int) -> int:
    """t1: one connection for the whole run; tn: one per call."""
    return 1 if mode == "t1" else calls


@pytest.mark.parametrize("mode", ["t1", "tn"])
def test_builtin_uac_invite_ack_bye(start_transport: StartTransport, tmp_path: Path, mode: str) -> None:
    """sipp's built-in ``uac``: INVITE -> 200 -> ACK -> BYE -> 200, on one or many connections."""
    calls, rate = 500, 400
    transport = start_transport(workers=2, threads=2)
    result = run_sipp(
        transport.host, transport.port, tmp_path / "sipp",
        scenario="uac", transport=mode, calls=calls, rate=rate, timeout=20,
    )  # fmt: skip
    assert_clean_sipp(result, calls)
    details = result.describe()
    assert (result.sent("INVITE"), result.sent("ACK"), result.sent("BYE")) == (calls, calls, calls), details
    assert result.requests_sent == 3 * calls, details
    assert result.received(200) == 2 * calls, details  # the INVITE's and the BYE's; ACK gets no answer
    assert_counters(transport, messages_in=3 * calls, sent=2 * calls, accepted=expected_accepts(mode, calls))


@pytest.mark.parametrize("mode", ["t1", "tn"])
def test_options_scenario(start_transport: StartTransport, tmp_path: Path, mode: str) -> None:
    """Our own scenario: OPTIONS -> 200 whose CSeq echoes the request's."""
    calls, rate = 1000, 500
    transport = start_transport(workers=2, threads=2)
    result = run_sipp(
        transport.host, transport.port, tmp_path / "sipp",
        scenario="options_uac.xml", transport=mode, calls=calls, rate=rate, timeout=20,
    )  # fmt: skip
    assert_clean_sipp(result, calls)
    details = result.describe()
    assert result.sent("OPTIONS") == result.requests_sent == calls, details
    assert result.received(200) == calls, details
    assert_counters(transport, messages_in=calls, sent=calls, accepted=expected_accepts(mode, calls))


def ctl_threads(transport: RunningTransport, size: int) -> dict[str, Any]:
    """``sipwire ctl threads N --json``, the operator's way to resize the pool."""
    done = run_ctl(transport, "threads", str(size), "--json")
    assert done.returncode == 0, f"ctl threads {size}: rc {done.returncode}\n{done.stdout}\n{done.stderr}"
    state: dict[str, Any] = json.loads(done.stdout)
    return state


def connections_by_remote(transport: RunningTransport) -> dict[str, dict[str, Any]]:
    return {info["remote"]: info for info in transport.control("connections")["connections"]}


def wait_for_connections(transport: RunningTransport, count: int) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + 5.0
    while True:
        infos = connections_by_remote(transport)
        if len(infos) >= count or time.monotonic() > deadline:
            return infos
        time.sleep(0.02)


def test_resize_under_load(start_transport: StartTransport, tmp_path: Path) -> None:
    """Resize the I/O pool 4 -> 1 -> 8 -> 2 while sipp sends OPTIONS over t1 and tn at the same time.

    Three idle connections opened first take threads 0-2, so sipp's t1
    connection lands on thread 3 and has to move, mid-traffic, when the
    pool shrinks to 1. Growing to 8 spreads the new tn connections over the
    new threads; shrinking to 2 moves those still open. Not one call may
    fail and both ends must count the same messages.
    """
    seconds = 12
    t1_rate, tn_rate = 400, 150
    t1_calls, tn_calls = t1_rate * seconds, tn_rate * seconds
    transport = start_transport(workers=2, threads=4)
    # New connections go to the thread with the fewest connections plus inbox jobs, so no control
    # request (each one posts a job to every thread) may run while they are being accepted.
    placeholders = [transport.connect() for _ in range(3)]
    try:
        time.sleep(QUIET_SECONDS)
        idle = wait_for_connections(transport, 3)
        with Sipp(
            transport.host, transport.port, tmp_path / "sipp-t1",
            scenario="options_uac.xml", transport="t1", calls=t1_calls, rate=t1_rate, timeout=seconds + 15,
        ) as sipp_t1:  # fmt: skip
            time.sleep(QUIET_SECONDS)
            t1_conn = [info for remote, info in wait_for_connections(transport, 4).items() if remote not in idle]
            placement = f"placeholders {sorted(i['thread'] for i in idle.values())}, t1 {t1_conn}"
            assert len(t1_conn) == 1 and t1_conn[0]["thread"] != 0, f"t1 must sit on a retiring thread: {placement}"
            t1_remote = t1_conn[0]["remote"]
            with Sipp(
                transport.host, transport.port, tmp_path / "sipp-tn",
                scenario="options_uac.xml", transport="tn", calls=tn_calls, rate=tn_rate, timeout=seconds + 15,
            ) as sipp_tn:  # fmt: skip
                results = drive_resizes(transport, sipp_t1, sipp_tn, t1_remote)
    finally:
        for sock in placeholders:
            sock.close()
    t1, tn = results["t1"], results["tn"]
    assert_clean_sipp(t1, t1_calls)
    assert_clean_sipp(tn, tn_calls)
    both = t1.describe() + "\n" + tn.describe()
    assert (t1.requests_sent, tn.requests_sent) == (t1_calls, tn_calls), both
    assert (t1.received(200), tn.received(200)) == (t1_calls, tn_calls), both
    requests = t1.requests_sent + tn.requests_sent
    answers = t1.received(200) + tn.received(200)
    assert_counters(transport, messages_in=requests, sent=answers, accepted=len(placeholders) + 1 + tn_calls)
    final = transport.control("threads")
    assert final["size"] == 2, final


def drive_resizes(transport: RunningTransport, sipp_t1: Sipp, sipp_tn: Sipp, t1_remote: str) -> dict[str, SippResult]:
    """Resize a few seconds apart while both sipps run, then wait for both (concurrently)."""
    started = time.monotonic()
    t1_messages: list[int] = []
    for at, size in ((2.5, 1), (5.5, 8), (8.5, 2)):
        time.sleep(max(0.0, started + at - time.monotonic()))
        assert sipp_t1.process.poll() is None, "sipp t1 ended before the resize"
        assert sipp_tn.process.poll() is None, "sipp tn ended before the resize"
        state = ctl_threads(transport, size)
        assert state["size"] == size, state
        t1_info = connections_by_remote(transport).get(t1_remote)
        assert t1_info is not None, f"the t1 connection {t1_remote} is gone after resizing to {size}"
        assert t1_info["thread"] < size, t1_info
        t1_messages.append(t1_info["messages_in"])
    # the t1 connection kept receiving across the resizes
    assert t1_messages == sorted(t1_messages) and t1_messages[0] < t1_messages[-1], t1_messages
    results: dict[str, SippResult | BaseException] = {}

    def wait(name: str, sipp: Sipp) -> None:
        try:
            results[name] = sipp.wait()
        except BaseException as error:
            results[name] = error

    waiters = [threading.Thread(target=wait, args=item) for item in (("t1", sipp_t1), ("tn", sipp_tn))]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    finished: dict[str, SippResult] = {}
    for name, outcome in results.items():
        if isinstance(outcome, BaseException):
            raise outcome
        finished[name] = outcome
    return finished
