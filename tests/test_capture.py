"""The capture ring and its queries, without sockets: bounds, eviction counts, filters, threads.

Entries are built exactly as the I/O threads build them (MESSAGE records from
``wire.encode_message``, a connection prefix and payload for what is sent).
"""

from __future__ import annotations

import sys
import threading
import tracemalloc
from collections.abc import Sequence
from typing import ClassVar

import pytest

from sipwire.config import ConfigError, Settings, load
from sipwire.errors import ControlError
from sipwire.otel.recorder import WriteTrace, traceparent
from sipwire.transport.capture import EVICT_STEP_BYTES, CaptureRing, Outbound, charge, decode
from sipwire.transport.capturequery import MAX_CALLS_PER_PAGE, MAX_MESSAGES_PER_CALL, CaptureQuery, summarize
from sipwire.transport.wire import decode_prefix, encode_message, message_prefix

PREFIX = message_prefix(7, "tcp", ("127.0.0.1", 5060), ("127.0.0.1", 40000))
PREFIX6 = message_prefix(8, "tls", ("::1", 5061), ("::1", 40001))


def request(method: str, call_id: str, caller: str = "alice", callee: str = "bob", body: bytes = b"") -> bytes:
    return (
        f"{method} sip:{callee}@sip.test SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:40000;branch=z9hG4bK{call_id}\r\n"
        f"From: <sip:{caller}@sip.test>;tag=a\r\nTo: <sip:{callee}@sip.test>\r\nCall-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def response(status: int, call_id: str, caller: str = "alice", callee: str = "bob") -> bytes:
    return (
        f"SIP/2.0 {status} Whatever\r\nVia: SIP/2.0/TCP 127.0.0.1:40000;branch=z9hG4bK{call_id}\r\n"
        f"From: <sip:{caller}@sip.test>;tag=a\r\nTo: <sip:{callee}@sip.test>;tag=b\r\nCall-ID: {call_id}\r\n"
        "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def received(ring: CaptureRing, *messages: bytes, at: float = 1000.0, context: bytes = b"") -> None:
    ring.received([encode_message(PREFIX, at, context, message) for message in messages])


def test_the_ring_keeps_what_fits_in_its_bytes_evicts_the_oldest_and_counts_them() -> None:
    ring = CaptureRing(65536)
    message = request("OPTIONS", "call-0000")
    for index in range(1000):
        received(ring, request("OPTIONS", f"call-{index:04d}"))
    stats = ring.statistics()
    record_size = charge(encode_message(PREFIX, 0.0, b"", message))
    assert 65536 * 15 // 16 - record_size < stats["bytes"] <= 65536  # eviction cuts down to 15/16 of it
    assert stats["bytes"] == stats["messages"] * record_size
    assert stats["appended"] == 1000 and stats["messages"] + stats["evicted"] == 1000
    oldest, entries = ring.entries()
    assert oldest == stats["evicted"] and len(entries) == stats["messages"]
    calls = CaptureQuery(ring, bodies=False).calls({"limit": MAX_CALLS_PER_PAGE})
    newest = [call["call_id"] for call in calls["calls"]]
    assert newest[0] == "call-0999" and f"call-{oldest - 1:04d}" not in newest  # the oldest went first


def test_a_message_larger_than_the_ring_leaves_it_empty_not_over_its_bound() -> None:
    ring = CaptureRing(65536)
    ring.sent(PREFIX, request("MESSAGE", "big", body=b"x" * 70000), None)
    assert ring.statistics() | {"capacity_bytes": 0} == {
        "messages": 0, "bytes": 0, "capacity_bytes": 0, "appended": 1, "evicted": 1,
    }  # fmt: skip


def test_sent_and_received_entries_decode_with_their_connection_time_and_trace() -> None:
    ring = CaptureRing(1 << 20)
    received(ring, request("INVITE", "c1"), at=1234.5, context=traceparent(0xAB, 0xCD))
    trace = WriteTrace(0xEF, 1, 2, 0)
    ring.sent(PREFIX6, response(200, "c1"), trace)
    detail = CaptureQuery(ring, bodies=False).call({"call_id": "c1"})
    assert detail is not None
    first, second = detail["messages"]
    assert (first["direction"], first["method"], first["time"], first["trace_id"]) == (
        "in",
        "INVITE",
        1234.5,
        f"{0xAB:032x}",
    )
    assert (first["connection"], first["local"], first["remote"], first["transport"]) == (
        7, "127.0.0.1:5060", "127.0.0.1:40000", "tcp",
    )  # fmt: skip
    assert (second["direction"], second["status"], second["trace_id"]) == ("out", 200, f"{0xEF:032x}")
    assert (second["connection"], second["local"], second["remote"], second["transport"]) == (
        8, "[::1]:5061", "[::1]:40001", "tls",
    )  # fmt: skip
    assert first["seq"] < second["seq"]


def test_bodies_are_withheld_unless_the_setting_shows_them() -> None:
    ring = CaptureRing(1 << 20)
    received(ring, request("MESSAGE", "m1", body=b"secret text"))
    hidden = CaptureQuery(ring, bodies=False).call({"call_id": "m1"})
    shown = CaptureQuery(ring, bodies=True).call({"call_id": "m1"})
    assert hidden is not None and shown is not None
    [withheld], [full] = hidden["messages"], shown["messages"]
    assert "secret" not in withheld["text"] and withheld["text"].endswith("\r\n\r\n")
    assert (withheld["body_bytes"], withheld["body_withheld"]) == (11, True)
    assert full["text"].endswith("secret text") and full["body_withheld"] is False


def test_calls_are_filtered_paged_and_newest_first() -> None:
    ring = CaptureRing(1 << 20)
    received(ring, request("INVITE", "call-a/1@h", caller="alice", callee="bob"), at=100.0)
    received(ring, response(486, "call-a/1@h"), at=110.0)  # from a callee: the times are the test's
    received(ring, request("INVITE", "call-b", caller="carol", callee="dave"), at=200.0)
    received(ring, response(200, "call-b", caller="carol", callee="dave"), at=210.0)
    received(ring, request("MESSAGE", "call-c", caller="alice", callee="erin"), at=300.0)
    received(ring, b"NOT SIP AT ALL\r\n\r\n", at=310.0)  # no Call-ID: summarized, listed in no call
    query = CaptureQuery(ring, bodies=False)

    def ids(**filters: object) -> list[str]:
        return [call["call_id"] for call in query.calls(filters)["calls"]]

    assert ids() == ["call-c", "call-b", "call-a/1@h"]
    assert ids(call_id="a/1@") == ["call-a/1@h"] == ids(call_id="CALL-A/1@H")  # every text filter ignores case
    assert ids(from_user="ALI") == ["call-c", "call-a/1@h"]
    assert ids(to_user="dave") == ["call-b"]
    assert ids(method="message") == ["call-c"]
    assert ids(status=486) == ["call-a/1@h"]
    assert ids(since=150.0, until=250.0) == ["call-b"]
    assert ids(since=250.0, until=150.0) == []  # an empty window is no error
    assert ids(limit=1, offset=1) == ["call-b"] and query.calls({"limit": 1})["total"] == 3
    [invite] = query.calls({"call_id": "call-a"})["calls"]
    assert (invite["first_method"], invite["from_user"], invite["to_user"], invite["last_status"]) == (
        "INVITE", "alice", "bob", 486,
    )  # fmt: skip
    assert query.call({"call_id": "call-z"}) is None


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"status": 99}, "status 99 is not a SIP status code"),
        ({"status": "200"}, "status must be an integer"),
        ({"limit": 0}, f"limit 0 is outside 1..{MAX_CALLS_PER_PAGE}"),
        ({"offset": -1}, "offset -1 must not be negative"),
        ({"since": "now"}, "since must be a number"),
        ({"call_id": 5}, "call_id must be a string"),
        ({"method": "x" * 300}, "method must be a string of at most 256"),
    ],
)
def test_invalid_filters_are_refused_naming_the_value(arguments: dict[str, object], reason: str) -> None:
    with pytest.raises(ControlError, match=reason):
        CaptureQuery(CaptureRing(1 << 16), bodies=False).calls(arguments)


def test_several_writer_threads_and_a_reader_keep_the_counts_exact() -> None:
    """I/O threads append while the control thread reads: every message is held or counted as evicted."""
    ring = CaptureRing(1 << 18)
    query = CaptureQuery(ring, bodies=False)
    per_thread, threads_count = 3000, 4
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(thread: int) -> None:
        for index in range(per_thread):
            call_id = f"t{thread}-{index}"
            if index % 2:
                ring.sent(PREFIX, response(200, call_id), None)
            else:
                received(ring, request("INVITE", call_id))

    def read() -> None:
        try:
            while not stop.is_set():
                query.calls({"limit": 10})
        except BaseException as error:  # reported below: a reader must never fail on a changing ring
            errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(index,)) for index in range(threads_count)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    reader.join()
    assert errors == []
    stats = ring.statistics()
    assert stats["appended"] == per_thread * threads_count
    assert stats["messages"] + stats["evicted"] == stats["appended"] and stats["evicted"] > 0
    oldest, entries = ring.entries()
    held = sum(map(charge, entries))
    assert held == stats["bytes"] <= stats["capacity_bytes"] and oldest == stats["evicted"]
    listed = query.calls({"limit": MAX_CALLS_PER_PAGE})
    held_calls = {summarize(decode(oldest + offset, entry)).call_id for offset, entry in enumerate(entries)}
    assert listed["total"] == len(held_calls)


def test_capture_settings_are_bounded() -> None:
    assert Settings().capture is True and Settings().capture_bodies is False
    for size in (1024, 1 << 31):
        with pytest.raises(ConfigError, match="capture_bytes"):
            load(overrides={"capture_bytes": size})


def test_a_message_queued_before_its_connect_finished_gets_the_address_the_connection_got() -> None:
    """Outbound: the first message is captured while the connection has no local address yet (port 0)."""
    ring = CaptureRing(1 << 20)
    ring.sent(message_prefix(9, "tcp", ("0.0.0.0", 0), ("127.0.0.1", 5080)), request("INVITE", "o1"), None)
    ring.received([encode_message(message_prefix(9, "tcp", ("127.0.0.1", 45000), ("127.0.0.1", 5080)), 2.0, b"",
                                  response(200, "o1"))])  # fmt: skip
    detail = CaptureQuery(ring, bodies=False).call({"call_id": "o1"})
    assert detail is not None
    assert [m["local"] for m in detail["messages"]] == ["127.0.0.1:45000", "127.0.0.1:45000"]


def test_summaries_share_a_calls_strings_and_intern_none_of_the_peers_text() -> None:
    """Interned strings are never freed on some CPython builds: peer text must stay ordinary, shared per call."""
    ring = CaptureRing(1 << 20)
    call_id = "leak-check-7f3a9c"
    received(ring, request("INVITE", call_id, caller="zed-caller", callee="zed-callee"))
    ring.sent(PREFIX, response(180, call_id, caller="zed-caller", callee="zed-callee"), None)
    query = CaptureQuery(ring, bodies=False)
    query.calls({})
    first, second = query._calls[call_id].messages
    assert second.call_id is first.call_id and second.from_user is first.from_user
    assert second.remote is first.remote and second.to_uri is first.to_uri
    for text in (first.call_id, first.from_user, first.to_user, first.from_uri, first.remote, second.reason):
        fresh = "".join(list(text))  # an equal string, built at run time
        assert sys.intern(fresh) is not text, f"{text!r} was interned"


class _Payload(bytes):
    """A payload that notes, when it is freed, whether the ring's lock was held then."""

    lock_held_when_freed: ClassVar[list[bool]] = []
    ring: ClassVar[CaptureRing | None] = None

    def __del__(self) -> None:
        if _Payload.ring is not None:
            _Payload.lock_held_when_freed.append(_Payload.ring._lock.locked())


def test_one_eviction_is_bounded_and_frees_the_entries_outside_the_lock() -> None:
    """A full 64 MiB ring: 1/16 of it would be 4 MiB freed in one go, under the lock every I/O thread takes."""
    capacity = 64 << 20
    ring = CaptureRing(capacity)
    message = encode_message(PREFIX, 1.0, b"", request("OPTIONS", "fill"))
    entry_bytes = charge(message)
    _Payload.ring = ring
    try:
        for index in range(4):  # the oldest entries: the first eviction takes them
            ring.sent(PREFIX, _Payload(request("OPTIONS", f"probe-{index}")), None)
        evictions = []
        while len(evictions) < 3:
            before = ring.statistics()["evicted"]
            ring.received([message])
            if evicted := ring.statistics()["evicted"] - before:
                evictions.append(evicted)
        assert _Payload.lock_held_when_freed == [False] * 4
    finally:
        _Payload.ring = None
    assert all(0 < evicted <= EVICT_STEP_BYTES // entry_bytes + 2 for evicted in evictions), evictions
    assert ring.statistics()["bytes"] <= capacity


class _CountingRing(CaptureRing):
    """The real ring, counting the references each read copies out of it."""

    copied = 0

    def entries(self, from_seq: int = 0, limit: int | None = None) -> tuple[int, list[bytes | Outbound]]:
        oldest, entries = super().entries(from_seq, limit)
        self.copied += len(entries)
        return oldest, entries

    def picked(self, seqs: Sequence[int]) -> list[bytes | Outbound | None]:
        self.copied += len(seqs)
        return super().picked(seqs)


def test_queries_copy_only_what_arrived_since_the_last_one_and_one_calls_messages() -> None:
    ring = _CountingRing(8 << 20)
    for index in range(20000):
        received(ring, request("OPTIONS", f"call-{index}"))
    query = CaptureQuery(ring, bodies=False)
    assert query.calls({"limit": 5})["total"] == ring.statistics()["messages"]
    ring.copied = 0
    for index in range(10):
        received(ring, request("OPTIONS", f"new-{index}"))
    assert query.calls({"limit": 5})["calls"][0]["call_id"] == "new-9"
    assert ring.copied == 10
    ring.copied = 0
    detail = query.call({"call_id": "new-3"})
    assert detail is not None and detail["messages"][0]["text"].startswith("OPTIONS ")
    assert ring.copied == 1


def test_the_same_question_with_nothing_carried_since_gets_the_same_answer_without_work() -> None:
    ring = CaptureRing(1 << 20)
    received(ring, request("INVITE", "c1"))
    query = CaptureQuery(ring, bodies=False)
    first = query.calls({"limit": 5})
    assert query.calls({"limit": 5}) is first
    received(ring, request("INVITE", "c2"))
    assert query.calls({"limit": 5})["total"] == 2


@pytest.mark.parametrize(("from_seq", "limit"), [(0, 3), (2, 4), (5, None), (7, 100), (9, 1), (20, 5), (0, None)])
def test_a_slice_of_the_ring_is_the_same_taken_from_either_end(from_seq: int, limit: int | None) -> None:
    ring = CaptureRing(1 << 20)
    messages = [request("OPTIONS", f"s{index}") for index in range(12)]
    received(ring, *messages[:2])
    ring.statistics()
    for message in messages[2:]:
        received(ring, message)
    oldest, entries = ring.entries(from_seq, limit)
    wanted = messages[from_seq : None if limit is None else from_seq + limit]
    assert oldest == 0 and [decode(0, entry).raw for entry in entries] == wanted


def test_digest_responses_and_nonces_are_redacted_from_the_text_readers_get() -> None:
    """Captured credentials would let anyone who reads the console guess the password offline."""
    register = (
        b"REGISTER sip:sip.test SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:40000;branch=z9hG4bKr1\r\n"
        b"From: <sip:alice@sip.test>;tag=a\r\nTo: <sip:alice@sip.test>\r\nCall-ID: reg-1\r\nCSeq: 2 REGISTER\r\n"
        b'Authorization: Digest username="alice", realm="sip.test", nonce="n0nce-secret", uri="sip:sip.test",\r\n'
        b' response="6629fae49393a05397450978507c4ef1", algorithm=MD5, cnonce="c-secret", qop=auth, nc=00000001\r\n'
        b'proxy-authorization:Digest username="alice",realm="proxy.test",nonce=bare-secret,response=abcdef0123\r\n'
        b"Content-Length: 4\r\n\r\nbody"
    )
    received(ring := CaptureRing(1 << 20), register)
    for bodies in (False, True):
        detail = CaptureQuery(ring, bodies=bodies).call({"call_id": "reg-1"})
        assert detail is not None
        text = detail["messages"][0]["text"]
        for secret in ("n0nce-secret", "6629fae4", "c-secret", "bare-secret", "abcdef0123"):
            assert secret not in text
        assert 'username="alice", realm="sip.test"' in text and 'realm="proxy.test"' in text
        assert 'nonce="redacted"' in text and 'response="redacted"' in text and 'cnonce="redacted"' in text
        assert text.endswith("body") is bodies and 'uri="sip:sip.test"' in text and "nc=00000001" in text


@pytest.mark.parametrize("messages_per_call", [1, 2, 6])
def test_the_ring_and_its_summaries_stay_within_capture_bytes(messages_per_call: int) -> None:
    """The bound covers what the capture really holds: entries, payloads and the summaries a console made."""
    capacity = 2 << 20
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        ring = CaptureRing(capacity)
        query = CaptureQuery(ring, bodies=False)
        trace = 0x0123456789ABCDEF0123456789ABCDEF
        for index in range(6000 // messages_per_call):
            call_id = f"{index:08x}-memory@127.0.0.1"
            for step in range(messages_per_call):
                if step % 2:
                    ring.sent(PREFIX, response(200, call_id), WriteTrace(trace + index, 1, 2, 0))
                else:
                    received(ring, request("OPTIONS", call_id), at=1000.0 + index)
            if index % 500 == 0:
                query.calls({"limit": 5})
        query.calls({"limit": 5})
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert ring.statistics()["evicted"] > 0
    assert held <= capacity, f"{held} bytes held for capture_bytes {capacity}"


def test_a_long_call_keeps_its_newest_messages_and_counts_the_older_ones() -> None:
    """REGISTER refreshes on one Call-ID: the newest matter; the ring evicting the older ones is followed."""
    message = encode_message(PREFIX, 1.0, b"", request("REGISTER", "reg"))
    ring = CaptureRing(charge(message) * (MAX_MESSAGES_PER_CALL + 40))
    query = CaptureQuery(ring, bodies=False)
    for index in range(MAX_MESSAGES_PER_CALL + 5):
        received(ring, request("REGISTER", "reg"), at=float(index))
        if index % 300 == 0:
            query.calls({})
    detail = query.call({"call_id": "reg"})
    assert detail is not None and detail["earlier_not_shown"] == 5 and detail["truncated"]
    assert len(detail["messages"]) == MAX_MESSAGES_PER_CALL and detail["messages"][0]["time"] == 5.0
    assert query.calls({})["calls"][0]["messages"] == MAX_MESSAGES_PER_CALL + 5
    for index in range(60):  # the ring evicts the five cut ones, then kept ones
        received(ring, request("OPTIONS", f"other-{index}"))
    detail = query.call({"call_id": "reg"})
    assert detail is not None and detail["earlier_not_shown"] == 0 and not detail["truncated"]
    held = ring.statistics()["messages"] - 60
    assert len(detail["messages"]) == held and detail["messages"][-1]["time"] == MAX_MESSAGES_PER_CALL + 4
    for index in range(MAX_MESSAGES_PER_CALL + 40):
        received(ring, request("OPTIONS", f"more-{index}"))
    assert query.call({"call_id": "reg"}) is None


def test_a_message_prefix_decodes_to_what_built_it() -> None:
    prefix = message_prefix(2**40, "wss", ("::1", 443), ("2001:db8::7", 65535), tls="TLSv1.3")
    assert decode_prefix(prefix) == (2**40, "wss", ("::1", 443), ("2001:db8::7", 65535), "TLSv1.3", len(prefix))
