"""Records exchanged between the transport and its workers over raw socketpairs.

Every (I/O thread, worker) pair has its own stream socketpair: the "channel".
A channel carries a sequence of records, each a 5-byte header followed by
its body. Batching is the point: everything one read frames goes to a
worker in one ``send``, and a worker's replies to one batch come back in one.

Header: ``!BI`` = record kind, body length in bytes.

Transport to worker
    MESSAGE  ``!QBHHBBH`` conn id, transport code, local port, remote port,
             local host length, remote host length, TLS facts length; the two
             hosts (ASCII); the TLS facts (UTF-8, :meth:`TlsInfo.encode`, empty
             on TCP) — this part is built once per connection; then ``!dH``
             receive time (UNIX seconds), trace context length; the trace
             context (W3C ``traceparent``, may be empty); the raw message.
    OUTCOME  ``!QQB`` job id, conn id, result code; the reason (UTF-8).
    CONNECTIONS_CLOSED  ``!Q`` per connection: ids of connections that
             closed, sent by the I/O thread that closed them to every worker,
             batched (one record per worker per loop pass, at most
             :data:`MAX_CLOSED_PER_RECORD` ids). Only connections that carried
             a message are listed: the others cannot matter to a router. On a
             channel it follows every MESSAGE of those connections that
             thread sent to that worker, so a worker never learns of a close
             before the connection's last message (a registrar binding made by
             that message is removed, not left behind).

Worker to transport
    WRITE    ``!QQBBHBBB`` job id, conn id (0: send by destination), flags,
             transport code, port, host length, server name length, trace
             context length; the host (an IP literal); the TLS server name
             (ASCII: SNI and certificate check, may be empty); the trace
             context (W3C ``traceparent`` of the routing span that made the
             job, ASCII, empty when the message is not traced: the transport
             makes the job's ``sip.write`` span its child); the payload.
             Flag :data:`FLAG_PROMPT_OUTCOME`:
             the worker waits on this job's outcome, so report success at once;
             without it a ``sent`` outcome rides along with the next records
             for that worker (failures are always reported at once). Flag
             :data:`FLAG_NO_OUTCOME`: nobody waits at all, report nothing
             (the transport still counts and traces the outcome).
    DONE     ``!QI`` conn id, number of that connection's messages finished.
    COUNT    ``!Q`` delta; the counter name (ASCII, at most
             :data:`MAX_COUNTER_NAME_BYTES`): what the worker counted since
             its last batch, added to the I/O thread's counters (``ctl stats``,
             the stats block, ``/metrics``). Names come from a fixed set in
             the worker, never from peer text.
    CLOSE    ``!Q`` conn id: close that connection once its queued writes are
             out and its in-flight messages answered (a peer that sent
             something the worker could neither parse nor answer).
    SPANS    ``!II`` number of spans, worker pid; a :mod:`marshal` dump of a
             list of span records (:mod:`otel.recorder`). The I/O thread does
             not decode it: it hands the bytes to the transport's telemetry
             thread, which forwards them to the one exporter process
             (``otel/__init__.py``). At most :data:`MAX_SPANS_BYTES` of records.
    AUTH_FAILED  ``!Q`` conn id: the peer of that connection failed an
             authentication (wrong password, unknown user, forged or replayed
             nonce); the transport charges its address (``transport/sources.py``).
    STAGES   per worker stage (queue wait, routing), ``!d`` sum in ms and
             one ``!I`` count per latency bucket: what the worker observed
             since its last STAGES record, at most a few per second
             (:mod:`~sipwire.transport.stages`).

Bodies are bounded by :data:`MAX_RECORD_BYTES`; a reader that sees a larger
length knows the stream is corrupt and raises :class:`WireError`.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from sipwire.config import MAX_MESSAGE_BYTES_LIMIT
from sipwire.errors import ProtocolError
from sipwire.transport.outcome import WriteResult
from sipwire.transport.stages import StagesRecord, decode_stages

KIND_MESSAGE: Final = 1
KIND_OUTCOME: Final = 2
KIND_WRITE: Final = 3
KIND_DONE: Final = 4
KIND_COUNT: Final = 5
KIND_CLOSE: Final = 6
KIND_CONNECTIONS_CLOSED: Final = 7
KIND_SPANS: Final = 8
KIND_AUTH_FAILED: Final = 9
KIND_STAGES: Final = 10

TRANSPORT_CODES: Final = {"tcp": 1, "tls": 2, "ws": 3, "wss": 4}
TRANSPORT_NAMES: Final = {code: name for name, code in TRANSPORT_CODES.items()}
#: Every transport a connection can have, in the order tools list them.
TRANSPORTS: Final = tuple(TRANSPORT_CODES)

#: A record never exceeds one SIP message of the largest size settings allow plus its envelope
#: (hosts, TLS facts, trace context: a few KiB); twice the message limit leaves that room and
#: still catches garbage.
MAX_RECORD_BYTES: Final = 2 * MAX_MESSAGE_BYTES_LIMIT
#: The largest payload one WRITE record can carry (room left for its fixed part and names).
MAX_WRITE_PAYLOAD: Final = MAX_RECORD_BYTES - 1024
#: TLS facts beyond this are cut (a peer's certificate subject could be huge).
MAX_TLS_FACTS_BYTES: Final = 4096
#: WRITE flag: report a ``sent`` outcome at once (someone waits for it).
FLAG_PROMPT_OUTCOME: Final = 1
#: WRITE flag: report no outcome (no callback): no record, no wake-up of the worker for it.
FLAG_NO_OUTCOME: Final = 2
#: Connection ids per CONNECTIONS_CLOSED record (32 KiB): a mass close becomes several records.
MAX_CLOSED_PER_RECORD: Final = 4096
#: A SPANS record's payload stays under this (a worker's batch is split across records above it).
MAX_SPANS_BYTES: Final = 256 * 1024
#: Distinct MESSAGE prefixes (connections) a reader remembers decoded; past this it starts afresh.
MAX_KNOWN_PREFIXES: Final = 1024
#: Counter names are short fixed labels (``sip_parse_error.closed``); 64 bytes is ample
#: and keeps them within the stats block's 56-byte names plus a prefix.
MAX_COUNTER_NAME_BYTES: Final = 64

_HEADER = struct.Struct("!BI")
_MESSAGE_FIXED = struct.Struct("!QBHHBBH")
_MESSAGE_TIME = struct.Struct("!dH")
_OUTCOME = struct.Struct("!QQB")
_WRITE = struct.Struct("!QQBBHBBB")
_DONE = struct.Struct("!QI")
_COUNT = struct.Struct("!Q")
_CLOSE = struct.Struct("!Q")
_CONN_ID = struct.Struct("!Q")
_SPANS = struct.Struct("!II")
HEADER_SIZE: Final = _HEADER.size


class WireError(ProtocolError):
    """A channel's byte stream is corrupt (unknown kind or impossible length).

    ``records`` holds what the same :meth:`RecordReader.feed` call decoded before
    the corrupt record, so what is decoded does not depend on how reads split the stream.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.records: list[Record] = []


# Records are named tuples, not dataclasses: one is built per message on
# both sides of every channel, and tuple construction is several times
# cheaper than a frozen dataclass's __init__.


class MessageRecord(NamedTuple):
    conn_id: int
    transport: str
    local: tuple[str, int]
    remote: tuple[str, int]
    received_at: float
    trace_context: str
    raw: bytes
    tls: str = ""


class OutcomeRecord(NamedTuple):
    job_id: int
    conn_id: int
    result: WriteResult
    reason: str


class WriteRecord(NamedTuple):
    job_id: int
    conn_id: int
    transport: str
    host: str
    port: int
    payload: bytes
    server_name: str = ""
    flags: int = 0
    trace_context: str = ""


class DoneRecord(NamedTuple):
    conn_id: int
    messages: int


class CountRecord(NamedTuple):
    name: str
    delta: int


class CloseRecord(NamedTuple):
    conn_id: int


class ConnectionsClosedRecord(NamedTuple):
    conn_ids: tuple[int, ...]


class SpansRecord(NamedTuple):
    spans: int
    pid: int
    payload: bytes


class AuthFailedRecord(NamedTuple):
    conn_id: int


Record = (
    MessageRecord | OutcomeRecord | WriteRecord | DoneRecord | CountRecord | CloseRecord | ConnectionsClosedRecord
    | SpansRecord | AuthFailedRecord | StagesRecord
)  # fmt: skip


def message_prefix(
    conn_id: int, transport: str, local: tuple[str, int], remote: tuple[str, int], tls: str = ""
) -> bytes:
    """The per-connection part of a MESSAGE body, built once per connection (again after a handshake)."""
    local_host = local[0].encode("ascii")
    remote_host = remote[0].encode("ascii")
    tls_bytes = tls.encode("utf-8", "replace")[:MAX_TLS_FACTS_BYTES].decode("utf-8", "ignore").encode()
    fixed = _MESSAGE_FIXED.pack(
        conn_id, TRANSPORT_CODES[transport], local[1], remote[1], len(local_host), len(remote_host), len(tls_bytes)
    )
    return fixed + local_host + remote_host + tls_bytes


def encode_message(prefix: bytes, received_at: float, trace_context: bytes, raw: bytes) -> bytes:
    """A MESSAGE record from a connection's prefix and one framed message."""
    body_length = len(prefix) + _MESSAGE_TIME.size + len(trace_context) + len(raw)
    return b"".join(
        (
            _HEADER.pack(KIND_MESSAGE, body_length),
            prefix,
            _MESSAGE_TIME.pack(received_at, len(trace_context)),
            trace_context,
            raw,
        )
    )


def encode_outcome(job_id: int, conn_id: int, result: WriteResult, reason: str) -> bytes:
    reason_bytes = reason.encode("utf-8", "replace")
    return (
        _HEADER.pack(KIND_OUTCOME, _OUTCOME.size + len(reason_bytes))
        + _OUTCOME.pack(job_id, conn_id, result.code)
        + reason_bytes
    )


def encode_write(
    job_id: int,
    conn_id: int,
    transport: str,
    host: str,
    port: int,
    payload: bytes,
    server_name: str = "",
    flags: int = 0,
    trace_context: str = "",
) -> bytes:
    """A WRITE record; ``server_name`` and ``trace_context`` must be ASCII and at most 255 bytes each."""
    host_bytes = host.encode("ascii") if host else b""  # a reply names its connection: no host, no name
    name_bytes = server_name.encode("ascii") if server_name else b""
    trace_bytes = trace_context.encode("ascii") if trace_context else b""
    fixed = _WRITE.pack(
        job_id,
        conn_id,
        flags,
        TRANSPORT_CODES[transport],
        port,
        len(host_bytes),
        len(name_bytes),
        len(trace_bytes),
    )
    length = _WRITE.size + len(host_bytes) + len(name_bytes) + len(trace_bytes) + len(payload)
    return b"".join((_HEADER.pack(KIND_WRITE, length), fixed, host_bytes, name_bytes, trace_bytes, payload))


def encode_done(conn_id: int, messages: int) -> bytes:
    return _HEADER.pack(KIND_DONE, _DONE.size) + _DONE.pack(conn_id, messages)


def encode_count(name: str, delta: int) -> bytes:
    """A COUNT record; ``name`` must be ASCII and at most :data:`MAX_COUNTER_NAME_BYTES` long."""
    name_bytes = name.encode("ascii")
    if not name_bytes or len(name_bytes) > MAX_COUNTER_NAME_BYTES:
        raise ValueError(f"counter name {name[:40]!r} is empty or exceeds {MAX_COUNTER_NAME_BYTES} bytes")
    return _HEADER.pack(KIND_COUNT, _COUNT.size + len(name_bytes)) + _COUNT.pack(delta) + name_bytes


def encode_close(conn_id: int) -> bytes:
    return _HEADER.pack(KIND_CLOSE, _CLOSE.size) + _CLOSE.pack(conn_id)


def encode_spans(spans: int, pid: int, payload: bytes) -> bytes:
    """A SPANS record: ``spans`` span records, already marshalled into ``payload``."""
    return _HEADER.pack(KIND_SPANS, _SPANS.size + len(payload)) + _SPANS.pack(spans, pid) + payload


def encode_auth_failed(conn_id: int) -> bytes:
    return _HEADER.pack(KIND_AUTH_FAILED, _CONN_ID.size) + _CONN_ID.pack(conn_id)


def encode_stages_record(body: bytes) -> bytes:
    """A STAGES record around ``body`` (:func:`~sipwire.transport.stages.encode_stages`)."""
    return _HEADER.pack(KIND_STAGES, len(body)) + body


def encode_connections_closed(conn_ids: list[int]) -> bytes:
    """CONNECTIONS_CLOSED records for ``conn_ids``: one per :data:`MAX_CLOSED_PER_RECORD` ids."""
    records = []
    for start in range(0, len(conn_ids), MAX_CLOSED_PER_RECORD):
        chunk = conn_ids[start : start + MAX_CLOSED_PER_RECORD]
        records.append(
            _HEADER.pack(KIND_CONNECTIONS_CLOSED, _CONN_ID.size * len(chunk)) + struct.pack(f"!{len(chunk)}Q", *chunk)
        )
    return b"".join(records)


class RecordReader:
    """Sans-IO decoder: feed channel bytes, get whole records back.

    A connection's MESSAGE records all start with the same prefix (:func:`message_prefix`), so each
    distinct prefix is decoded once and remembered (at most :data:`MAX_KNOWN_PREFIXES`, then afresh).
    """

    __slots__ = ("_buffer", "_prefixes")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._prefixes: dict[bytes, tuple[int, str, tuple[str, int], tuple[str, int], str]] = {}

    def feed(self, data: bytes) -> list[Record]:
        buffer = self._buffer
        buffer += data
        records: list[Record] = []
        offset = 0
        available = len(buffer)
        try:
            while available - offset >= HEADER_SIZE:
                kind, length = _HEADER.unpack_from(buffer, offset)
                if length > MAX_RECORD_BYTES:
                    raise WireError(f"record of kind {kind} claims {length} bytes (max {MAX_RECORD_BYTES})")
                end = offset + HEADER_SIZE + length
                if end > available:
                    break
                body = bytes(buffer[offset + HEADER_SIZE : end])
                try:
                    records.append(self._message(body) if kind == KIND_MESSAGE else _decode(kind, body))
                except (struct.error, KeyError, ValueError) as error:
                    raise WireError(f"undecodable record of kind {kind}: {error}") from error
                offset = end
        except WireError as error:
            error.records = records
            raise
        if offset:
            del buffer[:offset]
        return records

    def _message(self, body: bytes) -> MessageRecord:
        """A MESSAGE record, its connection part decoded once per distinct prefix."""
        fixed = _MESSAGE_FIXED.unpack_from(body)
        position = _MESSAGE_FIXED.size + fixed[4] + fixed[5] + fixed[6]
        key = body[:position]
        known = self._prefixes.get(key)
        if known is None:
            conn_id, transport, local, remote, tls, position = decode_prefix(body)  # WireError if it overruns
            known = (conn_id, transport, local, remote, tls)
            if len(self._prefixes) >= MAX_KNOWN_PREFIXES:
                self._prefixes.clear()
            self._prefixes[key] = known
        conn_id, transport, local, remote, tls = known
        received_at, trace_len = _MESSAGE_TIME.unpack_from(body, position)
        position += _MESSAGE_TIME.size
        trace = _take(body, position, trace_len, "MESSAGE trace context").decode("ascii") if trace_len else ""
        return MessageRecord(conn_id, transport, local, remote, received_at, trace, body[position + trace_len :], tls)


def _take(body: bytes, position: int, length: int, what: str) -> bytes:
    """``length`` bytes at ``position``, or WireError if they overrun the body."""
    if position + length > len(body):
        raise WireError(f"{what} of {length} bytes overruns its {len(body)}-byte record body")
    return body[position : position + length]


def decode_prefix(body: bytes) -> tuple[int, str, tuple[str, int], tuple[str, int], str, int]:
    """The connection part of a MESSAGE body (:func:`message_prefix`, alone or followed by the rest).

    Returns (connection id, transport, local, remote, TLS facts, where the rest begins); WireError if
    a length overruns ``body``.
    """
    conn_id, transport, local_port, remote_port, local_len, remote_len, tls_len = _MESSAGE_FIXED.unpack_from(body)
    position = _MESSAGE_FIXED.size
    local_host = _take(body, position, local_len, "MESSAGE local host").decode("ascii")
    position += local_len
    remote_host = _take(body, position, remote_len, "MESSAGE remote host").decode("ascii")
    position += remote_len
    tls = _take(body, position, tls_len, "MESSAGE TLS facts").decode("utf-8")
    position += tls_len
    return conn_id, TRANSPORT_NAMES[transport], (local_host, local_port), (remote_host, remote_port), tls, position


def _decode(kind: int, body: bytes) -> Record:
    """Any record but MESSAGE (:meth:`RecordReader._message`)."""
    if kind == KIND_WRITE:
        job_id, conn_id, flags, transport, port, host_len, name_len, trace_len = _WRITE.unpack_from(body)
        position = _WRITE.size
        host = _take(body, position, host_len, "WRITE host").decode("ascii")
        position += host_len
        server_name = _take(body, position, name_len, "WRITE server name").decode("ascii")
        position += name_len
        trace = _take(body, position, trace_len, "WRITE trace context").decode("ascii") if trace_len else ""
        position += trace_len
        return WriteRecord(
            job_id, conn_id, TRANSPORT_NAMES[transport], host, port, body[position:], server_name, flags, trace
        )
    if kind == KIND_DONE:
        conn_id, count = _DONE.unpack(body)
        return DoneRecord(conn_id, count)
    if kind == KIND_COUNT:
        (delta,) = _COUNT.unpack_from(body)
        name = body[_COUNT.size :]
        if not name or len(name) > MAX_COUNTER_NAME_BYTES:
            raise WireError(f"COUNT record with a counter name of {len(name)} bytes")
        return CountRecord(name.decode("ascii"), delta)
    if kind == KIND_CLOSE:
        (conn_id,) = _CLOSE.unpack(body)
        return CloseRecord(conn_id)
    if kind == KIND_AUTH_FAILED:
        (conn_id,) = _CONN_ID.unpack(body)
        return AuthFailedRecord(conn_id)
    if kind == KIND_CONNECTIONS_CLOSED:
        if not body or len(body) % _CONN_ID.size or len(body) > _CONN_ID.size * MAX_CLOSED_PER_RECORD:
            raise WireError(f"CONNECTIONS_CLOSED record of {len(body)} bytes")
        return ConnectionsClosedRecord(struct.unpack(f"!{len(body) // _CONN_ID.size}Q", body))
    if kind == KIND_SPANS:
        spans, pid = _SPANS.unpack_from(body)
        if len(body) - _SPANS.size > MAX_SPANS_BYTES:
            raise WireError(f"SPANS record of {len(body)} bytes")
        return SpansRecord(spans, pid, body[_SPANS.size :])
    if kind == KIND_STAGES:
        return decode_stages(body)
    if kind == KIND_OUTCOME:
        job_id, conn_id, code = _OUTCOME.unpack_from(body)
        return OutcomeRecord(job_id, conn_id, WriteResult.from_code(code), body[_OUTCOME.size :].decode("utf-8"))
    raise WireError(f"unknown record kind {kind}")
