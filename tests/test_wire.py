"""Channel records between transport and workers: exact layout, round trips, corrupt streams."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.outcome import WriteResult
from transport.wire import (
    HEADER_SIZE,
    KIND_DONE,
    KIND_MESSAGE,
    KIND_OUTCOME,
    KIND_WRITE,
    MAX_RECORD_BYTES,
    DoneRecord,
    MessageRecord,
    OutcomeRecord,
    Record,
    RecordReader,
    WireError,
    WriteRecord,
    encode_done,
    encode_message,
    encode_outcome,
    encode_write,
    message_prefix,
)

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)

SIP = b"OPTIONS sip:a@example.com SIP/2.0\r\nContent-Length: 0\r\n\r\n"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def encode(record: Record) -> bytes:
    """The bytes the production encoders produce for ``record``."""
    if isinstance(record, MessageRecord):
        prefix = message_prefix(record.conn_id, record.transport, record.local, record.remote)
        return encode_message(prefix, record.received_at, record.trace_context.encode("ascii"), record.raw)
    if isinstance(record, OutcomeRecord):
        return encode_outcome(record.job_id, record.conn_id, record.result, record.reason)
    if isinstance(record, WriteRecord):
        return encode_write(record.job_id, record.conn_id, record.transport, record.host, record.port, record.payload)
    return encode_done(record.conn_id, record.count)


def read_bytewise(data: bytes) -> list[Record]:
    reader = RecordReader()
    records: list[Record] = []
    for i in range(len(data)):
        records += reader.feed(data[i : i + 1])
    return records


def raw_record(kind: int, body: bytes) -> bytes:
    return struct.pack("!BI", kind, len(body)) + body


RECORDS: list[Record] = [
    MessageRecord(1, "tcp", ("127.0.0.1", 5060), ("192.0.2.10", 40001), 1_700_000_000.25, "", SIP),
    MessageRecord(2**64 - 1, "tls", ("::1", 5061), ("2001:db8::7", 65535), 0.0, TRACE, SIP + b"\x00\xff" * 100),
    MessageRecord(7, "tcp", ("", 0), ("", 0), -1.5, "", b""),
    *(OutcomeRecord(10 + result.code, 3, result, f"reason {result.label}") for result in WriteResult),
    OutcomeRecord(0, 0, WriteResult.SENT, ""),
    OutcomeRecord(5, 6, WriteResult.RESET, "connexion réinitialisée — 🔌"),
    WriteRecord(42, 9, "tcp", "", 0, SIP),
    WriteRecord(43, 0, "tls", "2001:db8::1", 5061, b""),
    WriteRecord(2**64 - 1, 0, "tcp", "192.0.2.1", 65535, bytes(range(256))),
    DoneRecord(9, 1),
    DoneRecord(2**64 - 1, 2**32 - 1),
    DoneRecord(0, 0),
]


@pytest.mark.parametrize("record", RECORDS, ids=[f"{type(r).__name__}-{i}" for i, r in enumerate(RECORDS)])
class TestRoundTrip:
    def test_whole(self, record: Record) -> None:
        reader = RecordReader()
        assert reader.feed(encode(record)) == [record]
        assert reader.feed(b"") == []

    def test_byte_by_byte(self, record: Record) -> None:
        data = encode(record)
        reader = RecordReader()
        for i in range(len(data) - 1):
            assert reader.feed(data[i : i + 1]) == [], i
        assert reader.feed(data[-1:]) == [record]

    def test_between_others_at_every_split(self, record: Record) -> None:
        neighbour = DoneRecord(1, 2)
        data = encode(neighbour) + encode(record) + encode(neighbour)
        for cut in range(len(data) + 1):
            reader = RecordReader()
            assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == [neighbour, record, neighbour], cut


def test_all_records_concatenated() -> None:
    data = b"".join(encode(record) for record in RECORDS)
    assert RecordReader().feed(data) == RECORDS
    assert read_bytewise(data) == RECORDS


def test_header_layout() -> None:
    assert HEADER_SIZE == 5
    assert (KIND_MESSAGE, KIND_OUTCOME, KIND_WRITE, KIND_DONE) == (1, 2, 3, 4)
    assert encode_done(0x0102030405060708, 0x0A0B0C0D) == (
        b"\x04\x00\x00\x00\x0c" + b"\x01\x02\x03\x04\x05\x06\x07\x08" + b"\x0a\x0b\x0c\x0d"
    )
    assert encode_outcome(1, 2, WriteResult.TIMEOUT, "t") == (
        b"\x02\x00\x00\x00\x12" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big") + b"\x02" + b"t"
    )
    assert encode_write(1, 2, "tls", "h", 5061, b"P") == (
        b"\x03\x00\x00\x00\x16"
        + (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + b"\x02"
        + (5061).to_bytes(2, "big")
        + b"\x01h"
        + b"P"
    )


def test_message_layout() -> None:
    prefix = message_prefix(3, "tcp", ("10.0.0.1", 5060), ("10.0.0.2", 1234))
    assert (
        prefix
        == ((3).to_bytes(8, "big") + b"\x01" + (5060).to_bytes(2, "big") + (1234).to_bytes(2, "big") + b"\x08\x08")
        + b"10.0.0.1"
        + b"10.0.0.2"
    )
    data = encode_message(prefix, 2.5, b"tp", b"RAW")
    body = prefix + struct.pack("!dH", 2.5, 2) + b"tp" + b"RAW"
    assert data == struct.pack("!BI", KIND_MESSAGE, len(body)) + body


def test_partial_header_is_kept() -> None:
    data = encode_done(5, 6)
    reader = RecordReader()
    assert reader.feed(data[:4]) == []
    assert reader.feed(data[4:] + data[:2]) == [DoneRecord(5, 6)]
    assert reader.feed(data[2:]) == [DoneRecord(5, 6)]


# -- corrupt streams -------------------------------------------------------------------------------


def test_oversize_length_is_rejected_from_the_header_alone() -> None:
    reader = RecordReader()
    with pytest.raises(WireError) as caught:
        reader.feed(struct.pack("!BI", KIND_MESSAGE, MAX_RECORD_BYTES + 1))
    assert str(caught.value) == f"record of kind 1 claims {MAX_RECORD_BYTES + 1} bytes (max {MAX_RECORD_BYTES})"


def test_oversize_length_after_a_good_record() -> None:
    with pytest.raises(WireError):
        RecordReader().feed(encode_done(1, 1) + struct.pack("!BI", 9, 0xFFFFFFFF))


def test_largest_allowed_length_waits_for_its_body() -> None:
    reader = RecordReader()
    assert reader.feed(struct.pack("!BI", KIND_WRITE, MAX_RECORD_BYTES)) == []


def test_largest_record_round_trips() -> None:
    payload_room = MAX_RECORD_BYTES - struct.calcsize("!QQBHB") - len("192.0.2.1")
    record = WriteRecord(1, 0, "tcp", "192.0.2.1", 5060, b"p" * payload_room)
    data = encode(record)
    assert len(data) == HEADER_SIZE + MAX_RECORD_BYTES
    assert RecordReader().feed(data) == [record]


@pytest.mark.parametrize("kind", [0, 5, 6, 127, 255])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(WireError) as caught:
        RecordReader().feed(raw_record(kind, b"abc"))
    assert str(caught.value) == f"unknown record kind {kind}"


_FIXED_MESSAGE = struct.pack("!QBHHBB", 1, 1, 5060, 5061, 0, 0)

CORRUPT_BODIES: list[tuple[str, int, bytes, str]] = [
    ("done_short", KIND_DONE, b"\x00" * 11, "undecodable record of kind 4"),
    ("done_long", KIND_DONE, b"\x00" * 13, "undecodable record of kind 4"),
    ("outcome_short", KIND_OUTCOME, b"\x00" * 16, "undecodable record of kind 2"),
    ("outcome_unknown_result", KIND_OUTCOME, struct.pack("!QQB", 1, 2, 200), "unknown write result code 200"),
    ("outcome_bad_utf8", KIND_OUTCOME, struct.pack("!QQB", 1, 2, 0) + b"\xff", "undecodable record of kind 2"),
    ("write_short", KIND_WRITE, b"\x00" * 10, "undecodable record of kind 3"),
    ("write_unknown_transport", KIND_WRITE, struct.pack("!QQBHB", 1, 0, 9, 1, 0), "undecodable record of kind 3"),
    ("write_non_ascii_host", KIND_WRITE, struct.pack("!QQBHB", 1, 0, 1, 1, 1) + b"\xe9", "kind 3"),
    ("write_host_overruns", KIND_WRITE, struct.pack("!QQBHB", 1, 0, 1, 1, 9) + b"abc", "WRITE host of 9 bytes"),
    ("message_empty", KIND_MESSAGE, b"", "undecodable record of kind 1"),
    ("message_no_time", KIND_MESSAGE, _FIXED_MESSAGE, "undecodable record of kind 1"),
    (
        "message_unknown_transport",
        KIND_MESSAGE,
        struct.pack("!QBHHBB", 1, 3, 1, 1, 0, 0) + struct.pack("!dH", 0.0, 0),
        "undecodable record of kind 1",
    ),
    (
        "message_hosts_overrun",
        KIND_MESSAGE,
        struct.pack("!QBHHBB", 1, 1, 1, 1, 200, 200) + struct.pack("!dH", 0.0, 0),
        "undecodable record of kind 1",
    ),
    (
        "message_non_ascii_host",
        KIND_MESSAGE,
        struct.pack("!QBHHBB", 1, 1, 1, 1, 1, 0) + b"\xff" + struct.pack("!dH", 0.0, 0),
        "undecodable record of kind 1",
    ),
    (
        "message_trace_overruns",
        KIND_MESSAGE,
        _FIXED_MESSAGE + struct.pack("!dH", 0.0, 50) + b"00-abc",
        "MESSAGE trace context of 50 bytes",
    ),
    (
        "message_non_ascii_trace",
        KIND_MESSAGE,
        _FIXED_MESSAGE + struct.pack("!dH", 0.0, 1) + b"\x80" + SIP,
        "undecodable record of kind 1",
    ),
]


@pytest.mark.parametrize(
    ("name", "kind", "body", "message"), CORRUPT_BODIES, ids=[corrupt[0] for corrupt in CORRUPT_BODIES]
)
def test_corrupt_body(name: str, kind: int, body: bytes, message: str) -> None:
    with pytest.raises(WireError) as caught:
        RecordReader().feed(raw_record(kind, body))
    assert message in str(caught.value)
    with pytest.raises(WireError):
        read_bytewise(encode_done(1, 1) + raw_record(kind, body))


def test_trace_and_host_exactly_filling_the_body_are_fine() -> None:
    # The overrun checks must not reject records whose lengths are right at the end.
    message = _FIXED_MESSAGE + struct.pack("!dH", 0.0, 3) + b"abc"
    assert RecordReader().feed(raw_record(KIND_MESSAGE, message)) == [
        MessageRecord(1, "tcp", ("", 5060), ("", 5061), 0.0, "abc", b"")
    ]
    write = struct.pack("!QQBHB", 1, 0, 2, 7, 3) + b"abc"
    assert RecordReader().feed(raw_record(KIND_WRITE, write)) == [WriteRecord(1, 0, "tls", "abc", 7, b"")]


def test_encoders_reject_what_the_layout_cannot_hold() -> None:
    with pytest.raises(KeyError):
        encode_write(1, 0, "udp", "h", 1, b"")
    with pytest.raises(struct.error):
        encode_write(1, 0, "tcp", "h", 70000, b"")
    with pytest.raises(UnicodeEncodeError):
        message_prefix(1, "tcp", ("höst", 1), ("h", 1))


# -- properties ------------------------------------------------------------------------------------

_U64 = st.integers(min_value=0, max_value=2**64 - 1)
_PORT = st.integers(min_value=0, max_value=65535)
_HOST = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=40)
_TRANSPORT = st.sampled_from(["tcp", "tls"])
_FLOAT = st.floats(allow_nan=False)

_RECORDS = st.one_of(
    st.builds(
        MessageRecord,
        _U64,
        _TRANSPORT,
        st.tuples(_HOST, _PORT),
        st.tuples(_HOST, _PORT),
        _FLOAT,
        _HOST,
        st.binary(max_size=200),
    ),
    st.builds(OutcomeRecord, _U64, _U64, st.sampled_from(list(WriteResult)), st.text(max_size=30)),
    st.builds(WriteRecord, _U64, _U64, _TRANSPORT, _HOST, _PORT, st.binary(max_size=200)),
    st.builds(DoneRecord, _U64, st.integers(min_value=0, max_value=2**32 - 1)),
)


def _reason_survives(record: Record) -> Record:
    """Outcome reasons are encoded with errors="replace": lone surrogates come back as "?"."""
    if isinstance(record, OutcomeRecord):
        reason = record.reason.encode("utf-8", "replace").decode("utf-8")
        return OutcomeRecord(record.job_id, record.conn_id, record.result, reason)
    return record


@PROPERTY_SETTINGS
@given(records=st.lists(_RECORDS, max_size=6), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_random_records_round_trip_at_any_split(records: list[Record], cuts: list[int]) -> None:
    data = b"".join(encode(record) for record in records)
    expected = [_reason_survives(record) for record in records]
    assert RecordReader().feed(data) == expected
    points = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    reader = RecordReader()
    decoded: list[Record] = []
    for start, end in itertools.pairwise(points):
        decoded += reader.feed(data[start:end])
    assert decoded == expected


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0), max_size=4))
def test_arbitrary_bytes_give_records_or_wire_error(data: bytes, cuts: list[int]) -> None:
    points = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    reader = RecordReader()
    try:
        for start, end in itertools.pairwise(points):
            for record in reader.feed(data[start:end]):
                assert isinstance(record, MessageRecord | OutcomeRecord | WriteRecord | DoneRecord)
    except WireError:
        pass


@PROPERTY_SETTINGS
@given(kind=st.integers(min_value=0, max_value=255), body=st.binary(max_size=120))
def test_any_header_and_body_give_a_record_or_wire_error(kind: int, body: bytes) -> None:
    """Framed records with random content: decoded (and re-encodable) or WireError."""
    try:
        records = RecordReader().feed(raw_record(kind, body))
    except WireError:
        return
    assert len(records) == 1
    assert kind in (KIND_MESSAGE, KIND_OUTCOME, KIND_WRITE, KIND_DONE)
    assert encode(records[0]) == raw_record(kind, body)
