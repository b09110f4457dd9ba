"""Channel records between transport and workers: exact layout, round trips, corrupt streams."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipwire.transport.outcome import WriteResult
from sipwire.transport.stages import (
    LATENCY_BUCKETS_MS,
    STAGES_BYTES,
    StagesRecord,
    WorkerStages,
)
from sipwire.transport.tlsinfo import TlsInfo
from sipwire.transport.wire import (
    FLAG_PROMPT_OUTCOME,
    HEADER_SIZE,
    KIND_AUTH_FAILED,
    KIND_CLOSE,
    KIND_CONNECTIONS_CLOSED,
    KIND_COUNT,
    KIND_DONE,
    KIND_MESSAGE,
    KIND_OUTCOME,
    KIND_SPANS,
    KIND_STAGES,
    KIND_WRITE,
    MAX_COUNTER_NAME_BYTES,
    MAX_KNOWN_PREFIXES,
    MAX_RECORD_BYTES,
    MAX_SPANS_BYTES,
    MAX_TLS_FACTS_BYTES,
    AuthFailedRecord,
    CloseRecord,
    ConnectionsClosedRecord,
    CountRecord,
    DoneRecord,
    MessageRecord,
    OutcomeRecord,
    Record,
    RecordReader,
    SpansRecord,
    WireError,
    WriteRecord,
    encode_auth_failed,
    encode_close,
    encode_connections_closed,
    encode_count,
    encode_done,
    encode_message,
    encode_outcome,
    encode_spans,
    encode_stages_record,
    encode_write,
    message_prefix,
)

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)

SIP = b"OPTIONS sip:a@example.com SIP/2.0\r\nContent-Length: 0\r\n\r\n"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
#: TLS facts as :meth:`TlsInfo.encode` writes them, with a non-ASCII certificate subject.
TLS_FACTS = TlsInfo(
    "TLSv1.3", "TLS_AES_256_GCM_SHA384", 12.5, "sip.example.com", "CN=Ægir Sørensen,O=Société Générale 🔐", "2031-01-01"
).encode()


def encode(record: Record) -> bytes:
    """The bytes the production encoders produce for ``record``."""
    if isinstance(record, MessageRecord):
        prefix = message_prefix(record.conn_id, record.transport, record.local, record.remote, record.tls)
        return encode_message(prefix, record.received_at, record.trace_context.encode("ascii"), record.raw)
    if isinstance(record, OutcomeRecord):
        return encode_outcome(record.job_id, record.conn_id, record.result, record.reason)
    if isinstance(record, WriteRecord):
        return encode_write(
            record.job_id,
            record.conn_id,
            record.transport,
            record.host,
            record.port,
            record.payload,
            record.server_name,
            record.flags,
            record.trace_context,
        )
    if isinstance(record, CountRecord):
        return encode_count(record.name, record.delta)
    if isinstance(record, CloseRecord):
        return encode_close(record.conn_id)
    if isinstance(record, ConnectionsClosedRecord):
        return encode_connections_closed(list(record.conn_ids))
    if isinstance(record, StagesRecord):
        return encode_stages_record(record.body())
    if isinstance(record, AuthFailedRecord):
        return encode_auth_failed(record.conn_id)
    if isinstance(record, SpansRecord):
        return encode_spans(record.spans, record.pid, record.payload)
    return encode_done(record.conn_id, record.messages)


def typed(records: list[Record]) -> list[tuple[type, Record]]:
    """Records with their classes: named tuples compare equal across classes and to plain tuples."""
    return [(type(record), record) for record in records]


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
    MessageRecord(8, "tls", ("192.0.2.1", 5061), ("192.0.2.2", 40002), 3.0, TRACE, SIP, TLS_FACTS),
    MessageRecord(9, "tls", ("", 0), ("", 0), 0.0, "", b"", "é"),
    *(OutcomeRecord(10 + result.code, 3, result, f"reason {result.label}") for result in WriteResult),
    OutcomeRecord(0, 0, WriteResult.SENT, ""),
    OutcomeRecord(5, 6, WriteResult.RESET, "connexion réinitialisée — 🔌"),
    WriteRecord(42, 9, "tcp", "", 0, SIP),
    WriteRecord(43, 0, "tls", "2001:db8::1", 5061, b""),
    WriteRecord(2**64 - 1, 0, "tcp", "192.0.2.1", 65535, bytes(range(256))),
    WriteRecord(44, 0, "tls", "192.0.2.5", 5061, SIP, "sip.example.com"),
    WriteRecord(45, 0, "tls", "", 0, b"", "s"),
    WriteRecord(46, 0, "tls", "h" * 255, 5061, b"\xff", "n" * 255),
    WriteRecord(47, 9, "tcp", "", 0, SIP, "", FLAG_PROMPT_OUTCOME),
    WriteRecord(48, 0, "tls", "192.0.2.5", 5061, SIP, "sip.example.com", FLAG_PROMPT_OUTCOME),
    WriteRecord(2**64 - 1, 2**64 - 1, "tls", "h", 65535, b"", "n", 0xFF),
    WriteRecord(49, 9, "tcp", "", 0, SIP, "", 0, TRACE),
    WriteRecord(50, 0, "tls", "192.0.2.5", 5061, SIP, "sip.example.com", FLAG_PROMPT_OUTCOME, TRACE),
    WriteRecord(51, 0, "tls", "h" * 255, 5061, b"", "n" * 255, 0xFF, "t" * 255),
    DoneRecord(9, 1),
    DoneRecord(2**64 - 1, 2**32 - 1),
    DoneRecord(0, 0),
    CountRecord("router_errors", 1),
    CountRecord("n" * MAX_COUNTER_NAME_BYTES, 2**64 - 1),
    CountRecord("x", 0),
    CloseRecord(9),
    CloseRecord(2**64 - 1),
    ConnectionsClosedRecord((9,)),
    ConnectionsClosedRecord((1, 2**64 - 1, 0)),
    AuthFailedRecord(9),
    AuthFailedRecord(2**64 - 1),
    SpansRecord(2, 4242, b"\xdb\x02\x00\x00\x00"),
    SpansRecord(0, 2**32 - 1, b""),
    SpansRecord(1, 1, b"s" * MAX_SPANS_BYTES),
]


@pytest.mark.parametrize("record", RECORDS, ids=[f"{type(r).__name__}-{i}" for i, r in enumerate(RECORDS)])
class TestRoundTrip:
    def test_whole(self, record: Record) -> None:
        reader = RecordReader()
        assert typed(reader.feed(encode(record))) == typed([record])
        assert reader.feed(b"") == []

    def test_byte_by_byte(self, record: Record) -> None:
        data = encode(record)
        reader = RecordReader()
        for i in range(len(data) - 1):
            assert reader.feed(data[i : i + 1]) == [], i
        assert typed(reader.feed(data[-1:])) == typed([record])

    def test_between_others_at_every_split(self, record: Record) -> None:
        neighbour = DoneRecord(1, 2)
        data = encode(neighbour) + encode(record) + encode(neighbour)
        for cut in range(len(data) + 1):
            reader = RecordReader()
            decoded = reader.feed(data[:cut]) + reader.feed(data[cut:])
            assert typed(decoded) == typed([neighbour, record, neighbour]), cut


def test_all_records_concatenated() -> None:
    data = b"".join(encode(record) for record in RECORDS)
    assert typed(RecordReader().feed(data)) == typed(RECORDS)
    assert typed(read_bytewise(data)) == typed(RECORDS)


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
        b"\x03\x00\x00\x00\x19"
        + (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + b"\x00"  # flags
        + b"\x02"
        + (5061).to_bytes(2, "big")
        + b"\x01\x00\x00"  # host, server name and trace context lengths
        + b"h"
        + b"P"
    )


def test_write_layout_with_server_name() -> None:
    # Host, then server name, then payload; both lengths in the fixed part.
    assert encode_write(1, 0, "tls", "10.0.0.1", 5061, b"PAY", "sip.example.com") == (
        b"\x03"
        + (23 + 8 + 15 + 3).to_bytes(4, "big")
        + (1).to_bytes(8, "big")
        + (0).to_bytes(8, "big")
        + b"\x00"  # flags
        + b"\x02"
        + (5061).to_bytes(2, "big")
        + b"\x08\x0f\x00"
        + b"10.0.0.1"
        + b"sip.example.com"
        + b"PAY"
    )


def test_message_layout() -> None:
    prefix = message_prefix(3, "tcp", ("10.0.0.1", 5060), ("10.0.0.2", 1234))
    assert (
        prefix
        == (
            (3).to_bytes(8, "big")
            + b"\x01"
            + (5060).to_bytes(2, "big")
            + (1234).to_bytes(2, "big")
            + b"\x08\x08"
            + b"\x00\x00"
        )
        + b"10.0.0.1"
        + b"10.0.0.2"
    )
    data = encode_message(prefix, 2.5, b"tp", b"RAW")
    body = prefix + struct.pack("!dH", 2.5, 2) + b"tp" + b"RAW"
    assert data == struct.pack("!BI", KIND_MESSAGE, len(body)) + body


def test_message_layout_with_tls_facts() -> None:
    # The TLS facts length counts UTF-8 bytes, not characters; the facts follow the hosts, before the time.
    facts = "TLSv1.3\tCN=Zoë"
    assert len(facts.encode("utf-8")) == 15 == len(facts) + 1
    prefix = message_prefix(3, "tls", ("10.0.0.1", 5061), ("10.0.0.2", 1234), facts)
    assert prefix == (
        (3).to_bytes(8, "big")
        + b"\x02"
        + (5061).to_bytes(2, "big")
        + (1234).to_bytes(2, "big")
        + b"\x08\x08"
        + b"\x00\x0f"
        + b"10.0.0.1"
        + b"10.0.0.2"
        + b"TLSv1.3\tCN=Zo\xc3\xab"
    )
    data = encode_message(prefix, 2.5, b"tp", b"RAW")
    body = prefix + struct.pack("!dH", 2.5, 2) + b"tp" + b"RAW"
    assert data == struct.pack("!BI", KIND_MESSAGE, len(body)) + body
    assert RecordReader().feed(data) == [
        MessageRecord(3, "tls", ("10.0.0.1", 5061), ("10.0.0.2", 1234), 2.5, "tp", b"RAW", facts)
    ]


def test_messages_of_many_connections_decode_past_the_remembered_prefixes() -> None:
    # Each connection's prefix is decoded once and remembered, up to MAX_KNOWN_PREFIXES; past that the
    # reader starts afresh. Every record still carries its own connection's facts, old and new alike.
    reader = RecordReader()
    count = MAX_KNOWN_PREFIXES + 10
    for rounds in range(2):
        for conn_id in range(1, count + 1):
            prefix = message_prefix(conn_id, "tcp", ("10.0.0.1", 5060), ("10.0.0.2", conn_id % 60000 + 1))
            (record,) = reader.feed(encode_message(prefix, float(rounds), b"", b"RAW %d" % conn_id))
            assert record == MessageRecord(
                conn_id, "tcp", ("10.0.0.1", 5060), ("10.0.0.2", conn_id % 60000 + 1), float(rounds), "",
                b"RAW %d" % conn_id,
            )  # fmt: skip
    assert len(reader._prefixes) <= MAX_KNOWN_PREFIXES


def test_write_layout_with_flags() -> None:
    # The flags byte sits between the conn id and the transport code.
    assert encode_write(1, 2, "tcp", "h", 5060, b"P", "", FLAG_PROMPT_OUTCOME) == (
        b"\x03\x00\x00\x00\x19"
        + (1).to_bytes(8, "big")
        + (2).to_bytes(8, "big")
        + b"\x01"  # flags
        + b"\x01"
        + (5060).to_bytes(2, "big")
        + b"\x01\x00\x00"
        + b"h"
        + b"P"
    )
    assert encode_write(1, 2, "tls", "h", 5061, b"", "s", 0xFF)[HEADER_SIZE + 16] == 0xFF


@pytest.mark.parametrize("flags", [0, FLAG_PROMPT_OUTCOME, 2, 0x80, 0xFF])
def test_write_flags_round_trip(flags: int) -> None:
    assert FLAG_PROMPT_OUTCOME == 1
    record = WriteRecord(7, 3, "tls", "192.0.2.1", 5061, SIP, "sip.example.com", flags)
    data = encode_write(7, 3, "tls", "192.0.2.1", 5061, SIP, "sip.example.com", flags=flags)
    assert data == encode(record)
    [decoded] = RecordReader().feed(data)
    assert isinstance(decoded, WriteRecord)
    assert decoded == record
    assert decoded.flags == flags
    assert typed(read_bytewise(data)) == typed([record])


def test_write_flags_default_to_zero() -> None:
    write = WriteRecord(1, 0, "tcp", "h", 1, b"x")
    assert write.flags == 0
    assert WriteRecord(1, 0, "tcp", "h", 1, b"x", "n").flags == 0
    assert encode_write(1, 0, "tcp", "h", 1, b"x") == encode_write(1, 0, "tcp", "h", 1, b"x", "", 0)
    assert encode_write(1, 0, "tcp", "h", 1, b"x") != encode_write(1, 0, "tcp", "h", 1, b"x", flags=FLAG_PROMPT_OUTCOME)
    [decoded] = RecordReader().feed(encode_write(1, 0, "tcp", "h", 1, b"x"))
    assert isinstance(decoded, WriteRecord)
    assert decoded == write
    assert decoded.flags == 0


def test_tls_fields_default_to_empty() -> None:
    message = MessageRecord(1, "tcp", ("a", 1), ("b", 2), 0.0, "", b"")
    write = WriteRecord(1, 0, "tcp", "h", 1, b"")
    assert message.tls == ""
    assert write.server_name == ""
    assert message_prefix(1, "tcp", ("a", 1), ("b", 2)) == message_prefix(1, "tcp", ("a", 1), ("b", 2), "")
    assert encode_write(1, 0, "tcp", "h", 1, b"x") == encode_write(1, 0, "tcp", "h", 1, b"x", "")
    # Omitted fields decode as empty strings, not None.
    prefix = message_prefix(1, "tcp", ("a", 1), ("b", 2))
    [decoded_message] = RecordReader().feed(encode_message(prefix, 0.0, b"", b""))
    [decoded_write] = RecordReader().feed(encode_write(1, 0, "tcp", "h", 1, b""))
    assert decoded_message == message
    assert decoded_write == write
    assert isinstance(decoded_message, MessageRecord)
    assert isinstance(decoded_write, WriteRecord)
    assert decoded_message.tls == ""
    assert decoded_write.server_name == ""


def test_write_trace_context_sits_after_the_server_name() -> None:
    # Host, server name, trace context, payload; the trace context length is the last byte of the fixed part.
    data = encode_write(1, 0, "tls", "10.0.0.1", 5061, b"PAY", "sip.example.com", 0, TRACE)
    fixed = struct.calcsize("!QQBBHBBB")
    assert fixed == 23
    assert data[HEADER_SIZE + fixed - 3 : HEADER_SIZE + fixed] == bytes((8, 15, len(TRACE)))
    assert data[HEADER_SIZE + fixed :] == b"10.0.0.1" + b"sip.example.com" + TRACE.encode() + b"PAY"
    [decoded] = RecordReader().feed(data)
    assert isinstance(decoded, WriteRecord)
    assert decoded.trace_context == TRACE
    assert decoded.payload == b"PAY"


def test_write_trace_context_defaults_to_empty() -> None:
    assert WriteRecord(1, 0, "tcp", "h", 1, b"x").trace_context == ""
    assert encode_write(1, 0, "tcp", "h", 1, b"x") == encode_write(1, 0, "tcp", "h", 1, b"x", "", 0, "")
    [decoded] = RecordReader().feed(encode_write(1, 0, "tcp", "h", 1, b"x"))
    assert isinstance(decoded, WriteRecord)
    assert decoded.trace_context == ""


def test_tls_info_survives_the_wire() -> None:
    info = TlsInfo("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", 3.25, "", "CN=José Müller,O=Çà", "")
    prefix = message_prefix(5, "tls", ("::1", 5061), ("::1", 50000), info.encode())
    [record] = read_bytewise(encode_message(prefix, 1.0, b"", SIP))
    assert isinstance(record, MessageRecord)
    assert TlsInfo.decode(record.tls) == info


def test_largest_tls_facts_and_server_name_round_trip() -> None:
    message = MessageRecord(1, "tls", ("::1", 5061), ("::1", 1), 1.0, TRACE, SIP, "é" * 2047 + "xy")
    assert len(message.tls.encode("utf-8")) == MAX_TLS_FACTS_BYTES == 4096
    write = WriteRecord(2, 0, "tls", "h" * 255, 5061, SIP, "n" * 255)
    data = encode(message) + encode(write)
    assert typed(RecordReader().feed(data)) == typed([message, write])
    assert typed(read_bytewise(data)) == typed([message, write])


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
    payload_room = (
        MAX_RECORD_BYTES - struct.calcsize("!QQBBHBBB") - len("192.0.2.1") - len("sip.example.com") - len(TRACE)
    )
    record = WriteRecord(1, 0, "tls", "192.0.2.1", 5061, b"p" * payload_room, "sip.example.com", 0, TRACE)
    data = encode(record)
    assert len(data) == HEADER_SIZE + MAX_RECORD_BYTES
    assert RecordReader().feed(data) == [record]


@pytest.mark.parametrize("kind", [0, 11, 127, 255])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(WireError) as caught:
        RecordReader().feed(raw_record(kind, b"abc"))
    assert str(caught.value) == f"unknown record kind {kind}"


def test_a_spans_record_over_its_limit_is_corrupt() -> None:
    with pytest.raises(WireError, match="SPANS record of"):
        RecordReader().feed(raw_record(KIND_SPANS, b"\x00" * (8 + MAX_SPANS_BYTES + 1)))


def test_spans_layout() -> None:
    assert encode_spans(3, 7, b"pp") == b"\x08\x00\x00\x00\x0a" + struct.pack("!II", 3, 7) + b"pp"


def test_count_and_close_layout() -> None:
    assert encode_count("router_errors", 3) == b"\x05\x00\x00\x00\x15" + struct.pack("!Q", 3) + b"router_errors"
    assert encode_close(0x0102030405060708) == b"\x06\x00\x00\x00\x08\x01\x02\x03\x04\x05\x06\x07\x08"


@pytest.mark.parametrize("name", ["", "n" * (MAX_COUNTER_NAME_BYTES + 1), "é"])
def test_count_names_are_bounded_ascii(name: str) -> None:
    with pytest.raises(ValueError):
        encode_count(name, 1)


@pytest.mark.parametrize(
    "name", [b"", b"n" * (MAX_COUNTER_NAME_BYTES + 1), b"\xff"], ids=["empty", "too_long", "not_ascii"]
)
def test_count_record_with_a_bad_name_is_corrupt(name: bytes) -> None:
    with pytest.raises(WireError):
        RecordReader().feed(raw_record(KIND_COUNT, struct.pack("!Q", 1) + name))


def test_stages_record_round_trips_what_the_worker_observed() -> None:
    stages = WorkerStages()
    assert stages.report(0.0) is None  # nothing observed: nothing to say
    stages.queue_wait.observe(0.03)
    stages.queue_wait.observe(70.0, times=2)
    stages.routing.observe(0.2, times=3)
    body = stages.report(1.0)
    assert body is not None and stages.report(2.0) is None  # reported deltas start afresh
    [record] = RecordReader().feed(encode_stages_record(body))
    assert isinstance(record, StagesRecord)
    (queue_counts, queue_ms), (routing_counts, routing_ms) = record.stages
    assert (sum(queue_counts), queue_ms) == (3, pytest.approx(140.03))
    assert queue_counts[LATENCY_BUCKETS_MS.index(0.05)] == 1 and queue_counts[LATENCY_BUCKETS_MS.index(100.0)] == 2
    assert (sum(routing_counts), routing_ms) == (3, pytest.approx(0.6))


def test_stages_record_of_another_bucket_layout_is_corrupt() -> None:
    with pytest.raises(WireError, match="STAGES record of 8 bytes"):
        RecordReader().feed(raw_record(KIND_STAGES, b"\x00" * 8))


def test_close_record_of_the_wrong_size_is_corrupt() -> None:
    with pytest.raises(WireError):
        RecordReader().feed(raw_record(KIND_CLOSE, b"\x00" * 9))


_FIXED_MESSAGE = struct.pack("!QBHHBBH", 1, 1, 5060, 5061, 0, 0, 0)
_TIME = struct.pack("!dH", 0.0, 0)

CORRUPT_BODIES: list[tuple[str, int, bytes, str]] = [
    ("done_short", KIND_DONE, b"\x00" * 11, "undecodable record of kind 4"),
    ("done_long", KIND_DONE, b"\x00" * 13, "undecodable record of kind 4"),
    ("auth_failed_short", KIND_AUTH_FAILED, b"\x00" * 7, "undecodable record of kind 9"),
    ("auth_failed_long", KIND_AUTH_FAILED, b"\x00" * 9, "undecodable record of kind 9"),
    ("outcome_short", KIND_OUTCOME, b"\x00" * 16, "undecodable record of kind 2"),
    ("outcome_unknown_result", KIND_OUTCOME, struct.pack("!QQB", 1, 2, 200), "unknown write result code 200"),
    ("outcome_bad_utf8", KIND_OUTCOME, struct.pack("!QQB", 1, 2, 0) + b"\xff", "undecodable record of kind 2"),
    ("write_short", KIND_WRITE, b"\x00" * 10, "undecodable record of kind 3"),
    # The older 22-byte fixed part (no trace context length) is one byte short of the new one.
    ("write_old_fixed_part", KIND_WRITE, struct.pack("!QQBBHBB", 1, 0, 0, 1, 1, 0, 0), "undecodable record of kind 3"),
    (
        "write_unknown_transport",
        KIND_WRITE,
        struct.pack("!QQBBHBBB", 1, 0, 0, 9, 1, 0, 0, 0),
        "undecodable record of kind 3",
    ),
    ("write_non_ascii_host", KIND_WRITE, struct.pack("!QQBBHBBB", 1, 0, 0, 1, 1, 1, 0, 0) + b"\xe9", "kind 3"),
    (
        "write_host_overruns",
        KIND_WRITE,
        struct.pack("!QQBBHBBB", 1, 0, 0, 1, 1, 9, 0, 0) + b"abc",
        "WRITE host of 9 bytes overruns its 26-byte record body",
    ),
    (
        "write_server_name_overruns",
        KIND_WRITE,
        struct.pack("!QQBBHBBB", 1, 0, 0, 2, 1, 1, 4, 0) + b"h" + b"abc",
        "WRITE server name of 4 bytes overruns its 27-byte record body",
    ),
    (
        "write_server_name_overruns_far",
        KIND_WRITE,
        struct.pack("!QQBBHBBB", 1, 0, 0, 2, 1, 0, 255, 0) + SIP,
        "WRITE server name of 255 bytes",
    ),
    (
        "write_trace_context_overruns",
        KIND_WRITE,
        struct.pack("!QQBBHBBB", 1, 0, 0, 1, 1, 1, 0, 55) + b"h" + b"00-abc",
        "WRITE trace context of 55 bytes overruns its 30-byte record body",
    ),
    (
        "write_non_ascii_trace_context",
        KIND_WRITE,
        struct.pack("!QQBBHBBB", 1, 0, 0, 1, 1, 0, 0, 1) + b"\x80" + SIP,
        "undecodable record of kind 3",
    ),
    (
        "write_non_ascii_server_name",
        KIND_WRITE,
        struct.pack("!QQBBHBBB", 1, 0, 0, 2, 1, 0, 2, 0) + "é".encode(),
        "undecodable record of kind 3",
    ),
    ("message_empty", KIND_MESSAGE, b"", "undecodable record of kind 1"),
    ("message_old_fixed_part", KIND_MESSAGE, struct.pack("!QBHHBB", 1, 1, 1, 1, 0, 0), "kind 1"),
    ("message_no_time", KIND_MESSAGE, _FIXED_MESSAGE, "undecodable record of kind 1"),
    (
        "message_unknown_transport",
        KIND_MESSAGE,
        struct.pack("!QBHHBBH", 1, 9, 1, 1, 0, 0, 0) + _TIME,
        "undecodable record of kind 1",
    ),
    (
        "message_hosts_overrun",
        KIND_MESSAGE,
        struct.pack("!QBHHBBH", 1, 1, 1, 1, 200, 200, 0) + _TIME,
        "MESSAGE local host of 200 bytes",
    ),
    (
        "message_remote_host_overruns",
        KIND_MESSAGE,
        struct.pack("!QBHHBBH", 1, 1, 1, 1, 1, 200, 0) + b"a" + _TIME,
        "MESSAGE remote host of 200 bytes",
    ),
    (
        "message_non_ascii_host",
        KIND_MESSAGE,
        struct.pack("!QBHHBBH", 1, 1, 1, 1, 1, 0, 0) + b"\xff" + _TIME,
        "undecodable record of kind 1",
    ),
    (
        "message_tls_overruns",
        KIND_MESSAGE,
        struct.pack("!QBHHBBH", 1, 2, 1, 1, 1, 1, 20) + b"ab" + _TIME,
        "MESSAGE TLS facts of 20 bytes overruns its 29-byte record body",
    ),
    (
        "message_tls_overruns_far",
        KIND_MESSAGE,
        struct.pack("!QBHHBBH", 1, 2, 1, 1, 0, 0, 0xFFFF) + _TIME + SIP,
        "MESSAGE TLS facts of 65535 bytes",
    ),
    (
        # The facts fit, but swallow the time and trace length that must follow them.
        "message_tls_swallows_time",
        KIND_MESSAGE,
        struct.pack("!QBHHBBH", 1, 2, 1, 1, 0, 0, len(_TIME)) + _TIME,
        "undecodable record of kind 1",
    ),
    (
        "message_tls_bad_utf8",
        KIND_MESSAGE,
        struct.pack("!QBHHBBH", 1, 2, 1, 1, 0, 0, 2) + b"\xc3\x28" + _TIME,
        "undecodable record of kind 1",
    ),
    (
        "message_tls_truncated_utf8",
        KIND_MESSAGE,
        struct.pack("!QBHHBBH", 1, 2, 1, 1, 0, 0, 1) + "é".encode() + _TIME[1:],
        "undecodable record of kind 1",
    ),
    (
        "message_trace_overruns",
        KIND_MESSAGE,
        _FIXED_MESSAGE + struct.pack("!dH", 0.0, 50) + b"00-abc",
        "MESSAGE trace context of 50 bytes overruns its 33-byte record body",
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
    write = struct.pack("!QQBBHBBB", 1, 0, 0, 2, 7, 3, 0, 0) + b"abc"
    assert RecordReader().feed(raw_record(KIND_WRITE, write)) == [WriteRecord(1, 0, "tls", "abc", 7, b"")]
    traced = struct.pack("!QQBBHBBB", 1, 0, 0, 2, 7, 1, 0, 3) + b"h" + b"abc"
    assert RecordReader().feed(raw_record(KIND_WRITE, traced)) == [WriteRecord(1, 0, "tls", "h", 7, b"", "", 0, "abc")]


def test_server_name_exactly_filling_the_body_is_fine() -> None:
    write = struct.pack("!QQBBHBBB", 1, 0, 0, 2, 7, 1, 3, 0) + b"h" + b"abc"
    assert RecordReader().feed(raw_record(KIND_WRITE, write)) == [WriteRecord(1, 0, "tls", "h", 7, b"", "abc")]
    # One byte more in the name length overruns.
    with pytest.raises(WireError, match="WRITE server name of 4 bytes overruns its 27-byte record body"):
        RecordReader().feed(raw_record(KIND_WRITE, struct.pack("!QQBBHBBB", 1, 0, 0, 2, 7, 1, 4, 0) + b"h" + b"abc"))


def test_tls_facts_exactly_before_the_time_are_fine() -> None:
    facts = "Zoë".encode()
    fixed = struct.pack("!QBHHBBH", 1, 2, 5061, 5062, 1, 1, len(facts))
    body = fixed + b"a" + b"b" + facts + struct.pack("!dH", 0.0, 0)
    assert RecordReader().feed(raw_record(KIND_MESSAGE, body)) == [
        MessageRecord(1, "tls", ("a", 5061), ("b", 5062), 0.0, "", b"", "Zoë")
    ]
    # Facts that exactly fill the body fit, but leave no room for the time.
    exact = struct.pack("!QBHHBBH", 1, 2, 5061, 5062, 0, 0, len(facts)) + facts
    with pytest.raises(WireError, match="undecodable record of kind 1"):
        RecordReader().feed(raw_record(KIND_MESSAGE, exact))
    # One byte more than the body holds overruns.
    over = struct.pack("!QBHHBBH", 1, 2, 5061, 5062, 0, 0, len(facts) + 1) + facts
    with pytest.raises(
        WireError, match=f"MESSAGE TLS facts of {len(facts) + 1} bytes overruns its 21-byte record body"
    ):
        RecordReader().feed(raw_record(KIND_MESSAGE, over))


@pytest.mark.parametrize("extra", [1, 2, 100, 0xFFFF])
def test_tls_facts_length_beyond_a_real_record_overruns(extra: int) -> None:
    # A real record whose TLS facts length claims more than everything after the hosts.
    data = encode(MessageRecord(1, "tls", ("a", 1), ("b", 2), 0.0, TRACE, SIP, TLS_FACTS))
    body = bytearray(data[HEADER_SIZE:])
    rest = len(body) - struct.calcsize("!QBHHBBH") - 2
    claimed = min(rest + extra, 0xFFFF)
    struct.pack_into("!H", body, struct.calcsize("!QBHHBB"), claimed)
    with pytest.raises(WireError, match=f"MESSAGE TLS facts of {claimed} bytes overruns"):
        RecordReader().feed(raw_record(KIND_MESSAGE, bytes(body)))
    with pytest.raises(WireError):
        read_bytewise(raw_record(KIND_MESSAGE, bytes(body)))


@pytest.mark.parametrize("extra", [1, 2, 255])
def test_server_name_length_beyond_a_real_record_overruns(extra: int) -> None:
    data = encode(WriteRecord(1, 0, "tls", "192.0.2.1", 5061, b"xy", "sip.example.com"))
    body = bytearray(data[HEADER_SIZE:])
    rest = len(body) - struct.calcsize("!QQBBHBBB") - len("192.0.2.1")
    claimed = min(rest + extra, 0xFF)
    struct.pack_into("!B", body, struct.calcsize("!QQBBHB"), claimed)
    with pytest.raises(WireError, match=f"WRITE server name of {claimed} bytes overruns"):
        RecordReader().feed(raw_record(KIND_WRITE, bytes(body)))


def test_encoders_reject_what_the_layout_cannot_hold() -> None:
    with pytest.raises(KeyError):
        encode_write(1, 0, "udp", "h", 1, b"")
    with pytest.raises(struct.error):
        encode_write(1, 0, "tcp", "h", 70000, b"")
    with pytest.raises(UnicodeEncodeError):
        message_prefix(1, "tcp", ("höst", 1), ("h", 1))
    # The server name is ASCII (SNI carries A-labels) and its length is one byte.
    with pytest.raises(UnicodeEncodeError):
        encode_write(1, 0, "tls", "h", 1, b"", "bücher.example")
    with pytest.raises(struct.error):
        encode_write(1, 0, "tls", "h", 1, b"", "n" * 256)
    # The flags are one byte.
    with pytest.raises(struct.error):
        encode_write(1, 0, "tcp", "h", 1, b"", "", 256)
    with pytest.raises(struct.error):
        encode_write(1, 0, "tcp", "h", 1, b"", "", -1)
    # The trace context is ASCII (a W3C traceparent) and its length is one byte.
    with pytest.raises(UnicodeEncodeError):
        encode_write(1, 0, "tcp", "h", 1, b"", "", 0, "00-é")
    with pytest.raises(struct.error):
        encode_write(1, 0, "tcp", "h", 1, b"", "", 0, "t" * 256)


def _decoded_tls(tls: str) -> tuple[int, str]:
    """The TLS facts length in the prefix and the facts a reader gets back."""
    prefix = message_prefix(1, "tls", ("h", 1), ("h", 2), tls)
    claimed = struct.unpack_from("!H", prefix, struct.calcsize("!QBHHBB"))[0]
    [record] = RecordReader().feed(encode_message(prefix, 0.0, b"", b""))
    assert isinstance(record, MessageRecord)
    return claimed, record.tls


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        # Fits exactly: unchanged.
        ("x" * 4096, "x" * 4096),
        ("é" * 2048, "é" * 2048),
        ("🔐" * 1024, "🔐" * 1024),
        # One byte over, on a character boundary.
        ("x" * 4097, "x" * 4096),
        ("é" * 2049, "é" * 2048),
        # Byte 4096 falls inside a character: the whole character goes.
        ("x" + "é" * 3000, "x" + "é" * 2047),
        ("ab" + "🔐" * 2000, "ab" + "🔐" * 1023),
        ("abc" + "🔐" * 2000, "abc" + "🔐" * 1023),
        ("x" * 4095 + "€", "x" * 4095),
        ("x" * 4094 + "€", "x" * 4094),
        ("x" * 4093 + "€" + "yz", "x" * 4093 + "€"),
        # Far beyond the old two-byte length limit.
        ("é" * 40000, "é" * 2048),
    ],
    ids=lambda value: f"{len(value)}chars",
)
def test_tls_facts_are_cut_at_a_utf8_boundary(facts: str, expected: str) -> None:
    assert MAX_TLS_FACTS_BYTES == 4096
    claimed, decoded = _decoded_tls(facts)
    assert decoded == expected
    assert claimed == len(expected.encode("utf-8")) <= MAX_TLS_FACTS_BYTES
    # A prefix of the original, no partial character turned into a replacement character.
    assert facts.startswith(decoded)
    assert "\ufffd" not in decoded
    # Nothing more would have fitted.
    if decoded != facts:
        assert len(facts[: len(decoded) + 1].encode("utf-8")) > MAX_TLS_FACTS_BYTES


def test_truncated_tls_facts_keep_the_rest_of_the_record() -> None:
    facts = "CN=" + "Ø" * 5000
    prefix = message_prefix(4, "tls", ("10.0.0.1", 5061), ("10.0.0.2", 1234), facts)
    data = encode_message(prefix, 2.5, TRACE.encode("ascii"), SIP)
    expected = MessageRecord(4, "tls", ("10.0.0.1", 5061), ("10.0.0.2", 1234), 2.5, TRACE, SIP, "CN=" + "Ø" * 2046)
    assert len(expected.tls.encode("utf-8")) == 4095
    assert typed(RecordReader().feed(data)) == typed([expected])
    assert typed(read_bytewise(data)) == typed([expected])


def test_tls_facts_with_lone_surrogates_are_replaced() -> None:
    prefix = message_prefix(1, "tls", ("h", 1), ("h", 2), "CN=\udcff!")
    [record] = RecordReader().feed(encode_message(prefix, 0.0, b"", b""))
    assert isinstance(record, MessageRecord)
    assert record.tls == "CN=?!"


# -- properties ------------------------------------------------------------------------------------

_U64 = st.integers(min_value=0, max_value=2**64 - 1)
_U32 = st.integers(min_value=0, max_value=2**32 - 1)
_PORT = st.integers(min_value=0, max_value=65535)
_HOST = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=40)
_TRANSPORT = st.sampled_from(["tcp", "tls"])
_FLOAT = st.floats(allow_nan=False)
#: Any text, including non-ASCII and lone surrogates (encoded with errors="replace"), and
#: facts over MAX_TLS_FACTS_BYTES (cut at a character boundary).
_TLS_FACTS = st.one_of(
    st.just(""),
    st.just(TLS_FACTS),
    st.text(max_size=60),
    st.builds(lambda head, tail: head * 4096 + tail, st.sampled_from(["x", "é", "€", "🔐"]), st.text(max_size=4)),
)
_SERVER_NAME = st.one_of(st.just(""), _HOST)
_TRACE = st.one_of(st.just(""), st.just(TRACE), _HOST)
_FLAGS = st.one_of(st.just(0), st.just(FLAG_PROMPT_OUTCOME), st.integers(min_value=0, max_value=255))

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
        _TLS_FACTS,
    ),
    st.builds(OutcomeRecord, _U64, _U64, st.sampled_from(list(WriteResult)), st.text(max_size=30)),
    st.builds(WriteRecord, _U64, _U64, _TRANSPORT, _HOST, _PORT, st.binary(max_size=200), _SERVER_NAME, _FLAGS, _TRACE),
    st.builds(DoneRecord, _U64, st.integers(min_value=0, max_value=2**32 - 1)),
    st.builds(CountRecord, st.text(alphabet="abc._", min_size=1, max_size=MAX_COUNTER_NAME_BYTES), _U64),
    st.builds(CloseRecord, _U64),
    st.builds(SpansRecord, _U32, _U32, st.binary(max_size=200)),
)


def _replaced(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _cut(text: str) -> str:
    """The longest run of whole characters from the start of ``text`` that fits MAX_TLS_FACTS_BYTES in UTF-8."""
    size = 0
    for index, char in enumerate(text):
        size += len(char.encode("utf-8"))
        if size > MAX_TLS_FACTS_BYTES:
            return text[:index]
    return text


def _reason_survives(record: Record) -> Record:
    """Outcome reasons and TLS facts are encoded with errors="replace": lone surrogates come back as "?".

    TLS facts are also cut to MAX_TLS_FACTS_BYTES at a character boundary.
    """
    if isinstance(record, OutcomeRecord):
        return OutcomeRecord(record.job_id, record.conn_id, record.result, _replaced(record.reason))
    if isinstance(record, MessageRecord):
        return MessageRecord(
            record.conn_id,
            record.transport,
            record.local,
            record.remote,
            record.received_at,
            record.trace_context,
            record.raw,
            _cut(_replaced(record.tls)),
        )
    return record


@PROPERTY_SETTINGS
@given(records=st.lists(_RECORDS, max_size=6), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_random_records_round_trip_at_any_split(records: list[Record], cuts: list[int]) -> None:
    data = b"".join(encode(record) for record in records)
    expected = [_reason_survives(record) for record in records]
    assert typed(RecordReader().feed(data)) == typed(expected)
    points = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    reader = RecordReader()
    decoded: list[Record] = []
    for start, end in itertools.pairwise(points):
        decoded += reader.feed(data[start:end])
    assert typed(decoded) == typed(expected)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0), max_size=4))
def test_arbitrary_bytes_give_records_or_wire_error(data: bytes, cuts: list[int]) -> None:
    points = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    reader = RecordReader()
    try:
        for start, end in itertools.pairwise(points):
            for record in reader.feed(data[start:end]):
                assert isinstance(
                    record,
                    MessageRecord | OutcomeRecord | WriteRecord | DoneRecord | CountRecord | CloseRecord
                    | ConnectionsClosedRecord | AuthFailedRecord | StagesRecord | SpansRecord,
                )  # fmt: skip
    except WireError:
        pass


@PROPERTY_SETTINGS
@given(kind=st.integers(min_value=0, max_value=255), body=st.binary(max_size=STAGES_BYTES + 8))
def test_any_header_and_body_give_a_record_or_wire_error(kind: int, body: bytes) -> None:
    """Framed records with random content: decoded (and re-encodable) or WireError."""
    try:
        records = RecordReader().feed(raw_record(kind, body))
    except WireError:
        return
    assert len(records) == 1
    kinds = (
        KIND_MESSAGE,
        KIND_OUTCOME,
        KIND_WRITE,
        KIND_DONE,
        KIND_COUNT,
        KIND_CLOSE,
        KIND_CONNECTIONS_CLOSED,
        KIND_AUTH_FAILED,
        KIND_STAGES,
        KIND_SPANS,
    )
    assert kind in kinds
    assert encode(records[0]) == raw_record(kind, body)
