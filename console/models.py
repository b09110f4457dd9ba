"""Pydantic models of every REST request and answer body (they are also the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sipwire.transport.connection import ConnectionInfo


class Health(BaseModel):
    """Transport up or down; when down, since when and why."""

    status: Literal["up", "down"]
    pid: int | None = Field(default=None, description="transport pid (the last one seen when down)")
    uptime: float | None = Field(default=None, description="seconds since the transport started")
    listening: dict[str, str] = Field(default_factory=dict, description='e.g. {"tcp": "127.0.0.1:5060"}')
    threads: int | None = None
    workers: int | None = None
    instance: str
    down_since: float | None = Field(default=None, description="UNIX time the console saw it go down")
    down_for: float | None = Field(default=None, description="seconds it has been down")
    error: str | None = Field(default=None, description="why it counts as down")
    reads_from: str = Field(description='"stats block" or "control socket"')


class ThreadInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: int
    connections: int
    load: float = Field(description="busy fraction of the last interval, 0..1")
    queue_depth: int = Field(description="jobs waiting in the thread's inbox")
    jobs: int = Field(description="inbox jobs done since the thread started")
    loop_lag_ms: float | None = None


class ThreadsState(BaseModel):
    size: int
    wanted: int | None = None
    max: int
    threads: list[ThreadInfo]


class ThreadsResize(BaseModel):
    """Resize the I/O pool to ``size`` threads (1..max_threads)."""

    size: int = Field(ge=1, description="wanted I/O pool size, 1..max_threads")


class ConnectionList(BaseModel):
    total: int = Field(description="connections matching the filters (before limit)")
    connections: list[ConnectionInfo]


class Closed(BaseModel):
    closed: int


class Worker(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: int
    pid: int
    alive: bool
    restarts: int
    in_flight: int
    done: int | None = None
    heartbeat_age: float | None = None


class HistogramBucket(BaseModel):
    le: float | Literal["+Inf"]
    count: int


class Histogram(BaseModel):
    model_config = ConfigDict(extra="ignore")

    count: int
    sum_ms: float | None = None
    buckets: list[HistogramBucket]
    p50: float | Literal["+Inf"] | None = None
    p95: float | Literal["+Inf"] | None = None
    p99: float | Literal["+Inf"] | None = None


class Stats(BaseModel):
    model_config = ConfigDict(extra="ignore")

    connections: int
    max_connections: int
    pending_write_bytes: int
    queue_depth: int = Field(description="jobs waiting in the I/O threads' inboxes, all threads")
    dispatch_in_flight: int
    counters: dict[str, int]
    tls_handshake_ms: Histogram
    ws_handshake_ms: Histogram | None = Field(None, description="WebSocket upgrades (WS, WSS), ms")
    # Where a message's time goes (stats block only; see sipwire.transport.stages), ms.
    read_framed_ms: Histogram | None = Field(None, description="from the read completing a message to its record")
    queue_wait_ms: Histogram | None = Field(None, description="framed until a worker takes the message up")
    routing_ms: Histogram | None = Field(None, description="the worker's parse and routing")
    write_latency_ms: Histogram | None = Field(None, description="a write job, queued on its connection until sent")
    dispatch_latency_ms: Histogram | None = Field(None, description="sent to a worker until its done count came back")
    workers: list[Worker]
    threads: list[dict[str, Any]]


class Problem(BaseModel):
    detail: str


class TraceSpan(BaseModel):
    span_id: str
    parent_id: str
    name: str
    kind: str
    service: str
    start_ns: int
    end_ns: int
    status: str
    status_message: str
    attributes: dict[str, str]


class TraceSummary(BaseModel):
    trace_id: str
    received_at: float
    root: str = Field(description="name of the root span")
    services: list[str]
    span_count: int
    duration_ms: float
    error: bool
    state: str = Field(
        description="assembling (its last span arrived under 2 s ago), incomplete (no root, or a parent "
        "never arrived) or complete"
    )


class TraceList(BaseModel):
    held: int = Field(description="traces held")
    spans: int = Field(description="spans held")
    capacity: int = Field(description="spans the store holds at most")
    retention_seconds: float = Field(description="how long a listed trace stays retrievable")
    evicted: dict[str, int] = Field(description="traces evicted to make room, by reason (fast, slow, error, pinned)")
    traces: list[TraceSummary]


class TraceDetail(TraceSummary):
    spans: list[TraceSpan]


class RegisteredContact(BaseModel):
    """One registered contact of an AOR and the flow that reaches it."""

    contact: str = Field(description="the Contact URI")
    expires: int = Field(description="seconds left")
    q: float | None = Field(default=None, description="the q value, when the phone sent one")
    instance: str | None = Field(default=None, description="+sip.instance (RFC 5626), without quotes")
    reg_id: int | None = Field(default=None, description="reg-id (RFC 5626)")
    flow: Literal["outbound", "connection"] = Field(
        description="outbound: an RFC 5626 flow (instance and reg-id); connection: the connection it registered on"
    )
    connection: int = Field(description="id of the connection requests for it leave on")
    transport: str
    local: str = Field(description="our HOST:PORT the phone connected to")
    remote: str = Field(description="HOST:PORT the REGISTER came from")
    user_agent: str
    last_seen: float = Field(description="UNIX time of the REGISTER that last refreshed it")


class Registration(BaseModel):
    aor: str = Field(description="address-of-record, user@domain")
    contacts: list[RegisteredContact]


class RegistrationList(BaseModel):
    registrations: list[Registration]


class UserEntry(BaseModel):
    """A user of the proxy, without any secret."""

    aor: str
    realm: str
    created: float = Field(description="UNIX time it was added")


class UserList(BaseModel):
    users: list[UserEntry]


class UserPassword(BaseModel):
    """A user's new password; it is hashed at once (HA1, MD5 and SHA-256) and never stored."""

    password: str = Field(min_length=8, max_length=1024)


class CaptureState(BaseModel):
    """The transport's capture ring (setting capture_bytes): what it holds and what it evicted."""

    messages: int
    bytes: int
    capacity_bytes: int
    appended: int = Field(description="messages captured since the transport started")
    evicted: int = Field(description="messages pushed out of the ring (oldest first)")
    bodies: bool = Field(description="bodies are shown (setting capture_bodies)")


class CallFacts(BaseModel):
    """What the call list and a call's page both say of a call (messages sharing a Call-ID)."""

    call_id: str
    first_method: str = Field(description="method of its first request captured")
    from_: str = Field(alias="from", description="From URI of its first request")
    to: str = Field(description="To URI of its first request")
    from_user: str
    to_user: str
    started: float = Field(description="UNIX time of its first message")
    last: float = Field(description="UNIX time of its last message")
    last_status: int | None = Field(description="status of the last response carried")
    connections: list[int]
    traced: bool = Field(description="some of its messages were traced")


class CallSummary(CallFacts):
    messages: int = Field(description="messages captured")


class CallList(BaseModel):
    total: int = Field(description="calls matching the filters (before offset and limit)")
    calls: list[CallSummary]
    capture: CaptureState


class CallMessage(BaseModel):
    """One carried message: a request (``method``) or a response (``status``)."""

    seq: int = Field(description="position in the capture, in carried order")
    time: float = Field(description="UNIX time received, or queued for sending")
    direction: Literal["in", "out"]
    connection: int
    transport: str
    local: str
    remote: str
    method: str | None = None
    status: int | None = None
    reason: str | None = None
    cseq: str
    trace_id: str | None = Field(description="the trace of this message, when it was traced")
    text: str | None = Field(default=None, description="start line and headers (and body when capture_bodies)")
    body_bytes: int | None = None
    body_withheld: bool | None = Field(default=None, description="a body was carried but is not shown")


class CallDetail(CallFacts):
    messages: list[CallMessage] = Field(description="in the order the transport carried them")
    earlier_not_shown: int = Field(
        default=0, description="older messages of the call still captured but beyond the per-call bound (newest kept)"
    )
    truncated: bool = Field(description="some messages or their text are missing (answer bounds, eviction)")
    capture: CaptureState
