"""The records a reader returns: plain values decoded from the stats block, for ``ctl``, the console and views."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from sipwire.transport.statsblock.layout import STALE_SECONDS, Capacities


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """The static and dynamic header, plus what the reader concluded about the writer."""

    name: str
    instance: str
    layout_version: int
    writer_pid: int
    started_wall: float
    started_mono: float
    capacities: Capacities
    updated_wall: float
    updated_mono: float
    updates: int
    status: str
    threads_wanted: int
    threads_running: int
    workers_wanted: int
    workers_alive: int
    max_connections: int
    connections: int
    slots_used: int
    slots_refused: int
    thread_records_refused: int
    pending_write_bytes: int
    queue_depth: int
    dispatch_in_flight: int
    listening: dict[str, str]
    writer_alive: bool
    age: float  # seconds since the last update (since the start if none yet)

    @property
    def stale(self) -> bool:
        return self.age > STALE_SECONDS

    @property
    def live(self) -> bool:
        return self.writer_alive and not self.stale and self.status != "stopped"


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    record: int
    state: str
    index: int
    connections: int
    load: float
    loop_lag_ms: float
    queue_depth: int
    in_flight: int
    jobs: int
    pending_write_bytes: int
    heartbeat: float
    started: float


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    index: int
    pid: int
    alive: bool
    in_flight: int
    done: int
    restarts: int
    heartbeat: float
    started: float


class ConnectionRecord(NamedTuple):
    """One used slot. A named tuple, not a dataclass: a snapshot builds one per connection, and
    tuple construction is several times cheaper (10,000 slots in well under 50 ms)."""

    slot: int
    id: int
    state: str
    transport: str
    outbound: bool
    thread: int
    local: str
    remote: str
    in_flight: int
    created: float
    last_activity: float
    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int
    pending_write_bytes: int
    tls_handshake_ms: float
    tls_version: str
    tls_cipher: str
    tls_server_name: str
    tls_peer_subject: str


@dataclass(frozen=True, slots=True)
class Counters:
    values: dict[str, int]
    dropped_names: int
    dropped_value: int


@dataclass(frozen=True, slots=True)
class Histogram:
    name: str
    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # len(bounds) + 1, the last one +Inf; not cumulative
    count: int
    sum_ms: float


@dataclass(slots=True)
class ReadCounts:
    """How hard reading was: seqlock retries, CRC mismatches after a stable sequence, records given up on."""

    retries: int = 0
    crc_failures: int = 0
    unreadable: int = 0
