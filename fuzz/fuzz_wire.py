"""Fuzz the worker-channel record decoder (``sipwire.transport.wire``) with atheris.

Run: ``python fuzz/fuzz_wire.py -max_total_time=60 CORPUS_DIR`` (libFuzzer flags; a
crash file as argument replays it). The corpus directory is seeded with records
carrying the messages of tests/corpus.

The first byte picks the mode.

* Even -- decode: bytes 1-2 say where to split, the rest is a channel stream.
  ``RecordReader.feed`` returns records or raises ``WireError``, nothing else;
  fed whole or in two parts it gives the same records (with those a ``WireError``
  carries) and the same error (or none); each record re-encodes to exactly the bytes it was decoded from (a MESSAGE
  whose TLS facts the encoder would cut is re-encoded and decoded back instead), and
  what stays buffered is the incomplete tail.
* Odd -- round trip: the rest drives ``atheris.FuzzedDataProvider`` to build up to 8
  valid records of any kind (field values anywhere in their ranges, text with any
  code point); encoded, concatenated and fed whole or split at a fuzzer-chosen
  point, they decode to the same records (text the encoder replaces or cuts
  compared as encoded).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import atheris

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fuzz.common import enable_hooks

    enable_hooks()

    with atheris.instrument_imports(include=["sipwire"]):
        import sipwire.transport.outcome
        import sipwire.transport.stages
        import sipwire.transport.wire  # noqa: F401

from fuzz.common import run, sip_corpus
from sipwire.transport.outcome import WriteResult
from sipwire.transport.stages import LATENCY_BUCKETS_MS, WORKER_STAGES, StagesRecord
from sipwire.transport.wire import (
    HEADER_SIZE,
    KIND_AUTH_FAILED,
    KIND_SPANS,
    KIND_STAGES,
    MAX_CLOSED_PER_RECORD,
    MAX_COUNTER_NAME_BYTES,
    MAX_SPANS_BYTES,
    MAX_TLS_FACTS_BYTES,
    TRANSPORT_CODES,
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

_HEADER = struct.Struct("!BI")
MAX_RECORDS = 8
#: The kinds build_record makes (4, DONE, is its fallback).
RECORD_KINDS = [1, 2, 3, 4, 5, 6, 7, KIND_SPANS, KIND_AUTH_FAILED, KIND_STAGES]
TRANSPORTS = sorted(TRANSPORT_CODES)
RESULTS = list(WriteResult)


def encode(record: Record) -> bytes:
    """The record as its sender would encode it."""
    if isinstance(record, MessageRecord):
        prefix = message_prefix(record.conn_id, record.transport, record.local, record.remote, record.tls)
        return encode_message(prefix, record.received_at, record.trace_context.encode("ascii"), record.raw)
    if isinstance(record, OutcomeRecord):
        return encode_outcome(record.job_id, record.conn_id, record.result, record.reason)
    if isinstance(record, WriteRecord):
        return encode_write(
            record.job_id, record.conn_id, record.transport, record.host, record.port, record.payload,
            record.server_name, record.flags, record.trace_context,
        )  # fmt: skip
    if isinstance(record, CountRecord):
        return encode_count(record.name, record.delta)
    if isinstance(record, CloseRecord):
        return encode_close(record.conn_id)
    if isinstance(record, ConnectionsClosedRecord):
        return encode_connections_closed(list(record.conn_ids))
    if isinstance(record, AuthFailedRecord):
        return encode_auth_failed(record.conn_id)
    if isinstance(record, StagesRecord):
        return encode_stages_record(record.body())
    if isinstance(record, SpansRecord):
        return encode_spans(record.spans, record.pid, record.payload)
    assert isinstance(record, DoneRecord), type(record)
    return encode_done(record.conn_id, record.messages)


def same(a: Record, b: Record) -> bool:
    """Equal records; times compared bit for bit (NaN included)."""
    if isinstance(a, MessageRecord) and isinstance(b, MessageRecord):
        bits = struct.pack("!d", a.received_at) == struct.pack("!d", b.received_at)
        return bits and a._replace(received_at=0.0) == b._replace(received_at=0.0)
    if isinstance(a, StagesRecord) and isinstance(b, StagesRecord):
        return a.body() == b.body()  # sums compared bit for bit (NaN included)
    return type(a) is type(b) and a == b


def feed(chunks: list[bytes]) -> tuple[list[Record], str | None, RecordReader]:
    reader = RecordReader()
    records: list[Record] = []
    for chunk in chunks:
        try:
            records += reader.feed(chunk)
        except WireError as error:
            return records + error.records, str(error), reader
    return records, None, reader


def check_fields(record: Record) -> None:
    if isinstance(record, MessageRecord):
        assert record.transport in TRANSPORT_CODES and isinstance(record.raw, bytes), record
        assert all(0 <= port < 65536 for port in (record.local[1], record.remote[1])), record
        assert isinstance(record.received_at, float) and record.trace_context.isascii(), record
    elif isinstance(record, WriteRecord):
        assert record.transport in TRANSPORT_CODES and 0 <= record.port < 65536 and 0 <= record.flags < 256, record
        assert record.host.isascii() and record.server_name.isascii() and record.trace_context.isascii(), record
    elif isinstance(record, OutcomeRecord):
        assert isinstance(record.result, WriteResult) and isinstance(record.reason, str), record
    elif isinstance(record, CountRecord):
        name = record.name
        assert name.isascii() and 0 < len(name) <= MAX_COUNTER_NAME_BYTES and 0 <= record.delta < 2**64, record
    elif isinstance(record, CloseRecord | AuthFailedRecord):
        assert 0 <= record.conn_id < 2**64, record
    elif isinstance(record, ConnectionsClosedRecord):
        assert 0 < len(record.conn_ids) <= MAX_CLOSED_PER_RECORD, record
    elif isinstance(record, StagesRecord):
        assert len(record.stages) == len(WORKER_STAGES), record
        assert all(len(counts) == len(LATENCY_BUCKETS_MS) + 1 for counts, _ in record.stages), record
    elif isinstance(record, SpansRecord):
        assert len(record.payload) <= MAX_SPANS_BYTES and 0 <= record.spans < 2**32, record
    else:
        assert isinstance(record, DoneRecord) and 0 <= record.messages < 2**32, record


def check_decode(control: bytes, stream: bytes) -> None:
    split = int.from_bytes(control, "big") % (len(stream) + 1)
    whole = feed([stream])
    halves = feed([stream[:split], stream[split:]])
    records, error, reader = whole
    assert len(halves[0]) == len(records) and all(map(same, halves[0], records)), (halves[0], records)
    assert halves[1] == error, (halves[1], error)
    if error is not None:
        assert error, "a WireError without a message"
    offset = 0
    for record in records:
        check_fields(record)
        _, length = _HEADER.unpack_from(stream, offset)
        original = stream[offset : offset + HEADER_SIZE + length]
        offset += HEADER_SIZE + length
        if isinstance(record, MessageRecord) and len(record.tls.encode()) > MAX_TLS_FACTS_BYTES:
            (again,) = RecordReader().feed(encode(record))
            assert isinstance(again, MessageRecord) and record.tls.startswith(again.tls), (record, again)
            assert same(again._replace(tls=record.tls), record), (record, again)
            continue
        assert encode(record) == original, f"{record!r} re-encodes to other bytes than {original!r}"
    if error is None:
        rest = stream[offset:]
        # What is left is one incomplete record: its header is not all there or its body is not.
        assert len(rest) < HEADER_SIZE or HEADER_SIZE + _HEADER.unpack_from(rest)[1] > len(rest), rest[:20]
        assert reader.feed(b"") == [], "nothing more to decode without new bytes"


def ascii_text(provider: atheris.FuzzedDataProvider, limit: int) -> str:
    return bytes(byte & 0x7F for byte in provider.ConsumeBytes(provider.ConsumeIntInRange(0, limit))).decode()


def build_record(provider: atheris.FuzzedDataProvider) -> tuple[Record, Record]:
    """A valid record from the provider, and the record it decodes to (text the encoder replaces or cuts)."""
    kind = provider.PickValueInList(RECORD_KINDS)
    conn_id = provider.ConsumeIntInRange(0, 2**64 - 1)
    if kind == 1:
        tls = provider.ConsumeUnicode(provider.ConsumeIntInRange(0, 1500))
        record: Record = MessageRecord(
            conn_id,
            provider.PickValueInList(TRANSPORTS),
            (ascii_text(provider, 255), provider.ConsumeIntInRange(0, 65535)),
            (ascii_text(provider, 255), provider.ConsumeIntInRange(0, 65535)),
            provider.ConsumeFloat(),
            ascii_text(provider, 300),
            provider.ConsumeBytes(provider.ConsumeIntInRange(0, 2000)),
            tls,
        )
        cut = tls.encode("utf-8", "replace")[:MAX_TLS_FACTS_BYTES].decode("utf-8", "ignore")
        return record, record._replace(tls=cut)
    if kind == 2:
        reason = provider.ConsumeUnicode(provider.ConsumeIntInRange(0, 300))
        record = OutcomeRecord(
            provider.ConsumeIntInRange(0, 2**64 - 1), conn_id, provider.PickValueInList(RESULTS), reason
        )
        return record, record._replace(reason=reason.encode("utf-8", "replace").decode())
    if kind == 3:
        record = WriteRecord(
            provider.ConsumeIntInRange(0, 2**64 - 1),
            conn_id,
            provider.PickValueInList(TRANSPORTS),
            ascii_text(provider, 255),
            provider.ConsumeIntInRange(0, 65535),
            provider.ConsumeBytes(provider.ConsumeIntInRange(0, 2000)),
            ascii_text(provider, 255),
            provider.ConsumeIntInRange(0, 255),
            ascii_text(provider, 255),
        )
        return record, record
    if kind == 5:
        name = ascii_text(provider, MAX_COUNTER_NAME_BYTES - 1) + "n"  # never empty
        record = CountRecord(name, provider.ConsumeIntInRange(0, 2**64 - 1))
        return record, record
    if kind == 6:
        record = CloseRecord(conn_id)
        return record, record
    if kind == KIND_AUTH_FAILED:
        record = AuthFailedRecord(conn_id)
        return record, record
    if kind == KIND_STAGES:
        stages = tuple(
            (tuple(provider.ConsumeIntInRange(0, 2**32 - 1) for _ in range(len(LATENCY_BUCKETS_MS) + 1)),
             provider.ConsumeRegularFloat())
            for _ in WORKER_STAGES
        )  # fmt: skip
        record = StagesRecord(stages)
        return record, record
    if kind == 7:
        ids = tuple(provider.ConsumeIntInRange(0, 2**64 - 1) for _ in range(provider.ConsumeIntInRange(1, 40)))
        record = ConnectionsClosedRecord(ids)
        return record, record
    if kind == KIND_SPANS:
        payload = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 2000))
        record = SpansRecord(
            provider.ConsumeIntInRange(0, 2**32 - 1), provider.ConsumeIntInRange(0, 2**32 - 1), payload
        )
        return record, record
    record = DoneRecord(conn_id, provider.ConsumeIntInRange(0, 2**32 - 1))
    return record, record


def check_round_trip(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    pairs = [build_record(provider) for _ in range(provider.ConsumeIntInRange(1, MAX_RECORDS))]
    stream = b"".join(encode(record) for record, _ in pairs)
    expected = [decoded for _, decoded in pairs]
    split = provider.ConsumeIntInRange(0, len(stream))
    for chunks in ([stream], [stream[:split], stream[split:]]):
        records, error, reader = feed(chunks)
        assert error is None, error
        assert len(records) == len(expected) and all(map(same, records, expected)), (records, expected)
        assert reader.feed(b"") == []


def check(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        check_round_trip(data[1:])
    elif len(data) >= 3:
        check_decode(data[1:3], data[3:])


def seeds() -> list[bytes]:
    records = []
    for index, message in enumerate(sip_corpus().values()):
        transport = TRANSPORTS[index % 2]
        tls = "" if transport == "tcp" else "TLSv1.3 TLS_AES_128_GCM_SHA256 peer=CN=client"
        prefix = message_prefix(index + 1, transport, ("127.0.0.1", 5060), ("127.0.0.1", 40000 + index), tls)
        trace = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" if index % 3 == 0 else b""
        records.append(encode_message(prefix, 1_700_000_000.25 + index, trace, message))
    records += [
        encode_write(7, 1, "tcp", "127.0.0.1", 5060, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", flags=1),
        encode_write(8, 0, "tls", "::1", 5061, b"x", server_name="sip.example.com", trace_context="00-ab-cd-01"),
        encode_outcome(7, 1, WriteResult.SENT, ""),
        encode_outcome(8, 0, WriteResult.TLS_FAILED, "certificate verify failed: \u00e9"),
        encode_done(1, 3),
    ]
    out = [b"\x00" + len(record).to_bytes(2, "big") + record for record in records]
    out.append(b"\x00\x00\x10" + b"".join(records[-5:]) + records[0][:9])
    out += [b"\x01" + record for record in records[-5:]]  # as round-trip drivers: arbitrary but varied
    return out


if __name__ == "__main__":
    run(check, seeds, "wire.dict")
