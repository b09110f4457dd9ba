"""One typed configuration object for every sipwire process.

Each setting has a safe default and a description (``sipwire config``
prints them all). Values are layered, later wins: the defaults below, a
TOML file (``--config FILE``, top-level keys named as the fields), the
environment (``SIPWIRE_`` + upper-cased field name), then command-line
flags. :func:`load` does the layering and validates the result once, so
the rest of the code can trust a :class:`Settings`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sipwire.errors import ConfigurationError

#: The largest ``max_message_bytes`` allowed: a message crosses a worker channel as one record, and
#: records are bounded (``sipwire.transport.wire.MAX_RECORD_BYTES`` is derived from this) so a corrupt
#: channel is caught. 512 KiB is eight times OpenSIPS's and Kamailio's 64 KiB.
MAX_MESSAGE_BYTES_LIMIT: Final = 1 << 19

#: Bounds of ``capture_bytes``: at least a few calls' worth, at most what a 2-core box should hold for it.
MIN_CAPTURE_BYTES: Final = 1 << 16
MAX_CAPTURE_BYTES: Final = 1 << 30


class ConfigError(ConfigurationError):
    """A setting has an invalid value; the message names the setting and the value."""


#: A poll longer than a few milliseconds only burns CPU: by then the peer's answer is not coming soon.
MAX_BUSY_POLL_US: Final = 5000


def cpu_set(text: str) -> frozenset[int]:
    """The CPUs a ``cpu_affinity`` list names (``1``, ``0,2-3``); empty for "". Raises ConfigError."""
    cpus: set[int] = set()
    for item in (part.strip() for part in text.split(",")) if text.strip() else ():
        first, dash, last = item.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())) or (dash and int(last) < int(first)):
            raise ConfigError(f"cpu_affinity: {item!r} is not a CPU number or range (as in 0,2-3)")
        cpus.update(range(int(first), int(last if dash else first) + 1))
    usable = os.sched_getaffinity(0)
    if not cpus <= usable:
        raise ConfigError(f"cpu_affinity: CPUs {sorted(cpus - usable)} are not available here ({sorted(usable)} are)")
    return frozenset(cpus)


def _setting(default: Any, description: str) -> Any:
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every tunable of the transport, its workers and tools."""

    instance: str = _setting(
        "default", "Instance name: separates the control socket and state of several sipwire runs."
    )
    state_dir: str = _setting(
        "",
        "Directory for the control socket and generated files; "
        "empty means $XDG_RUNTIME_DIR/sipwire, else /tmp/sipwire-UID.",
    )
    tcp: str = _setting(
        "127.0.0.1:5060", "TCP listen address HOST:PORT (port 0 picks a free port); empty disables TCP."
    )
    tls: str = _setting(
        "127.0.0.1:5061", "TLS listen address HOST:PORT (port 0 picks a free port); empty disables TLS."
    )
    ws: str = _setting(
        "",
        "SIP over WebSocket (RFC 7118) listen address HOST:PORT (port 0 picks a free port); empty (the default) "
        "disables WS.",
    )
    wss: str = _setting(
        "",
        "SIP over secure WebSocket listen address HOST:PORT, with the TLS listener's certificate and policy; empty "
        "(the default) disables WSS.",
    )
    ws_allowed_origins: str = _setting(
        "",
        "Comma-separated Origin values (e.g. https://phone.example.com) a WebSocket upgrade may carry; any other "
        "is refused 403 (ws_handshake_failed.origin). Requests without Origin (non-browser clients) pass. "
        "Empty: any origin.",
    )
    ws_max_frame_bytes: int = _setting(
        65536,
        "Largest WebSocket frame payload accepted; a larger one closes the WebSocket with 1009 (ws_close.1009). "
        "A whole WebSocket message carries one SIP message and is bounded by max_message_bytes the same way.",
    )
    ws_handshake_timeout: float = _setting(
        5.0,
        "Seconds from accept (WS) or the end of the TLS handshake (WSS) to a complete WebSocket upgrade request; "
        "then the connection is closed (ws_handshake_failed.timeout).",
    )
    ws_ping_interval: float = _setting(
        30.0,
        "Seconds a WebSocket may stay silent before the transport pings it (browsers send no keep-alives, and the "
        "pong keeps the connection within idle_timeout); no pong by the next interval closes it "
        "(closed_ws_ping_timeout).",
    )
    tls_cert: str = _setting(
        "", "PEM certificate chain for the TLS listener; empty: a self-signed ECDSA P-256 certificate is generated."
    )
    tls_key: str = _setting("", "PEM private key matching tls_cert.")
    tls_ca: str = _setting(
        "", "PEM CA bundle: verifies client certificates (mutual TLS) and outbound peers; empty: the system store."
    )
    tls_verify_clients: str = _setting(
        "none", "Client certificates on the TLS listener: none, optional (verified if sent) or require (mutual TLS)."
    )
    tls_handshake_timeout: float = _setting(
        5.0, "Seconds a TLS handshake may take, inbound or outbound, before the connection is closed."
    )
    tls_insecure_destinations: str = _setting(
        "",
        "Comma-separated HOST:PORT outbound TLS destinations whose certificate is NOT verified (labs only; "
        "logged at every connect).",
    )
    threads: int = _setting(2, "I/O threads at start (resizable at runtime with `sipwire ctl threads N`).")
    max_threads: int = _setting(64, "Upper bound for the I/O pool size, at start and on resize.")
    workers: int = _setting(os.cpu_count() or 1, "SIP worker processes in the unified pool.")
    router: str = _setting("responder", "Router run by the workers: `responder`, `proxy`, or `module:function`.")
    upstream: str = _setting(
        "", "SIP URI the `proxy` router forwards requests to, e.g. sip:127.0.0.1:5070;transport=tcp."
    )
    open_registrar: bool = _setting(
        False,
        "Labs only: the `proxy` router authenticates nobody (any REGISTER binds any address-of-record, any request "
        "is relayed). Without it, `--router proxy` needs at least one user (`sipwire users add`) and refuses to start.",
    )
    registrar_min_expires: int = _setting(
        60, "Shortest registration accepted, seconds; a shorter non-zero Expires is answered 423 with Min-Expires."
    )
    registrar_max_expires: int = _setting(3600, "Longest registration granted, seconds; longer requests are cut to it.")
    registrar_default_expires: int = _setting(
        3600, "Registration time when a REGISTER names none (no Expires header, no expires parameter), seconds."
    )
    registrar_max_contacts: int = _setting(
        10, "Contacts one address-of-record may hold; a REGISTER that would exceed it is answered 403."
    )
    registrar_wait_seconds: float = _setting(
        2.0,
        "Seconds a worker waits for the registrar database when another process writes; past it the request is "
        "answered 500 with Retry-After (registrar.busy).",
    )
    registrar_purge_seconds: float = _setting(
        30.0, "Seconds between purges of expired bindings and nonce counts by each worker."
    )
    digest_nonce_seconds: float = _setting(
        300.0,
        "Seconds a digest nonce is accepted; an older one (its HMAC still valid) is answered with stale=true, "
        "so the phone retries at once with a new nonce and no password prompt.",
    )
    digest_algorithms: str = _setting(
        "SHA-256,MD5",
        "Digest algorithms offered, in order (RFC 8760: SHA-256 first, MD5 for older phones); one challenge each.",
    )
    max_connections: int = _setting(
        2048, "Open connections at most (OpenSIPS default 2048); further accepts are closed at once and counted."
    )
    max_connections_per_ip: int = _setting(
        128,
        "Open connections from one peer address at most; more are closed at accept (refused.connections_per_ip). "
        "Phones behind one NAT share an address: raise it, or allow-list the NAT, for such sites.",
    )
    new_connections_per_ip: int = _setting(
        20,
        "New connections per second from one peer address (bursts of twice that); more are closed at accept "
        "(refused.connection_rate), as Kamailio's pike module would block them.",
    )
    requests_per_ip: int = _setting(
        500,
        "SIP messages per second from one peer address (bursts of twice that); more are answered 503 with "
        "Retry-After by the transport itself (limited.request_rate).",
    )
    auth_failures_per_ip: int = _setting(
        10,
        "Failed authentications (a wrong password, an unknown user, a forged or replayed nonce) from one peer "
        "address within auth_failure_window that block it for that long: its connection is closed after the "
        "answer (limited.auth_failures) and new ones at accept (refused.auth_failures).",
    )
    auth_failure_window: float = _setting(
        60.0, "Seconds over which auth_failures_per_ip failures are counted, and how long a blocked address stays so."
    )
    source_limits_allow: str = _setting(
        "127.0.0.0/8,::1",
        "Comma-separated addresses or networks the per-source limits never apply to (trusted peers: "
        "a trunk provider, an SBC; loopback by default for local tools and benchmarks).",
    )
    source_ipv6_prefix: int = _setting(
        64,
        "IPv6 peers count against the per-source limits by their prefix of this many bits (1..128): a host "
        "usually holds a whole /64 and may take a new address in it for each connection, which would escape "
        "every per-address limit; 128 counts each address apart.",
    )
    max_message_bytes: int = _setting(
        65536, "Largest SIP message accepted on a stream, headers and body (64 KiB, as OpenSIPS)."
    )
    max_header_bytes: int = _setting(16384, "Largest header block; a stream without CRLFCRLF by then is closed.")
    message_timeout: float = _setting(
        4.0, "Seconds to receive one whole message once its first byte arrived (OpenSIPS/Kamailio: 4 s)."
    )
    idle_timeout: float = _setting(
        120.0, "Seconds an idle connection (no traffic, nothing pending) stays open (120 s, as OpenSIPS)."
    )
    connect_timeout: float = _setting(
        3.0,
        "Seconds an outbound non-blocking connect may take. OpenSIPS uses 100 ms, Kamailio 10 s; "
        "3 s covers a lost SYN's first retransmission (1 s) on real networks without holding jobs for long.",
    )
    send_timeout: float = _setting(
        10.0,
        "Seconds a connection may keep queued bytes without the peer reading any before it is closed "
        "(Kamailio tcp_send_timeout: 10 s).",
    )
    write_queue_bytes: int = _setting(
        262144,
        "Bytes queued for one connection before write jobs fail with queue_full. Kamailio uses 32 KiB; "
        "a busy trunk connection needs more, and 256 KiB still bounds a stalled peer.",
    )
    global_write_queue_bytes: int = _setting(
        33554432,
        "Bytes queued over all connections before write jobs fail with limit_reached (32 MiB; Kamailio 10 MB).",
    )
    max_in_flight_per_connection: int = _setting(
        32,
        "Messages of one connection waiting on workers at most. Past it, the rest of what the connection sent "
        "waits in the transport and the connection is not read until workers answer, so a flooding peer cannot "
        "queue ahead of everyone else (fairness); a busy trunk still gets this many in parallel.",
    )
    dispatch_backlog_bytes: int = _setting(
        8388608, "Bytes waiting for one worker before new requests are answered 503 (overload protection)."
    )
    cpu_affinity: str = _setting(
        "",
        "CPUs the transport's I/O threads and its workers run on, e.g. `1` or `0,2-3` (worker processes inherit "
        "it). On a small machine, one CPU for a one-thread, one-worker pool keeps each hop's wake-up on the CPU "
        "that is already awake. Empty: wherever the kernel puts them.",
    )
    busy_poll_us: int = _setting(
        0,
        "Microseconds an I/O thread keeps polling instead of sleeping after it handled something, and a worker "
        "after it sent records: at low load the next hop's answer (a worker's write job, a peer's response) then "
        "finds it awake, one wake-up less, for CPU spent polling. An idle transport does not poll. With several "
        "I/O threads, a polling one takes turns at the GIL with the others. 0: off.",
    )
    dns_timeout: float = _setting(
        2.0,
        "Seconds a worker waits for a host name to resolve before the write job fails with unresolvable "
        "(lookups run on resolver threads, never on the worker's loop).",
    )
    dns_cache_seconds: float = _setting(60.0, "Seconds a resolved host name is reused without asking the DNS again.")
    dns_negative_cache_seconds: float = _setting(
        10.0, "Seconds a host name that failed to resolve is answered unresolvable without asking again."
    )
    dns_cache_entries: int = _setting(4096, "Host names each worker remembers, answers and failures (least recent go).")
    dns_threads: int = _setting(4, "Resolver threads per worker: lookups that can run at once.")
    dns_max_pending: int = _setting(
        256, "Lookups a worker lets wait at once; beyond, write jobs to new names fail with unresolvable."
    )
    shutdown_grace: float = _setting(2.0, "Seconds to flush queued writes and finish in-flight messages on shutdown.")
    capture: bool = _setting(
        True,
        "Keep the SIP messages the transport carries, in and out, in a bounded in-memory ring for the console's "
        "call-flow view (/calls, /api/calls) and its pcap export. They hold user data: readers follow the "
        "console's read rules (the admin token beyond loopback).",
    )
    capture_bytes: int = _setting(
        8 << 20,
        "Memory for the capture in bytes: the messages, plus about 900 (received) or 1,030 (sent) bytes each for "
        "their entry and the summary the call list reads; the oldest messages go first and are counted (capture "
        "evicted). 8 MiB holds about 6,500 typical messages.",
    )
    capture_bodies: bool = _setting(
        False,
        "Show captured message bodies (SDP, MESSAGE text) in the call-flow view and the pcap. Off: readers get "
        "the header block only, with the body's size.",
    )
    log_level: str = _setting("info", "Log level: debug, info, warning or error.")
    console_listen: str = _setting(
        "127.0.0.1:8080", "Ops console listen address HOST:PORT (loopback by default; port 0 picks a free port)."
    )
    console_allowed_hosts: str = _setting(
        "",
        "Host names and addresses the console answers to (Host header), comma-separated; a request for any other "
        "host gets 400 (stops DNS rebinding). Empty: loopback names and addresses plus the listen address; * : any.",
    )
    console_public_paths: str = _setting(
        "/api/health,/metrics",
        "Paths anyone who reaches the console may read when it listens beyond loopback; every other page and "
        "endpoint then needs the admin token or a login.",
    )
    console_token_file: str = _setting(
        "",
        "File the console writes its generated admin token to (mode 0600) when SIPWIRE_ADMIN_TOKEN is not set; "
        "empty means console-token in the runtime directory.",
    )
    console_jaeger_url: str = _setting(
        "", "Jaeger UI base URL, e.g. http://127.0.0.1:16686; when set, the traces page links each trace there."
    )
    trace_rate_limit: int = _setting(
        2000,
        "Traces the transport starts per second at most, whatever the sampler (0: no limit). Past it a message "
        "is not traced (counted: telemetry.unsampled_rate_limit), so tracing costs a bounded amount at any rate.",
    )
    console_trace_spans: int = _setting(
        30_000,
        "Spans the console's trace store holds (about 2 KiB each). When full it evicts whole traces: fast "
        "successful ones first, then slow ones, failed ones last, oldest first within each (counted by reason).",
    )
    console_trace_retention: float = _setting(
        60.0,
        "Seconds a trace shown in the trace list (the Traces page or GET /api/traces) stays retrievable, however "
        "many spans arrive meanwhile (within half of console_trace_spans for such traces).",
    )
    console_trace_slow_ms: float = _setting(
        200.0, "A trace lasting at least this many milliseconds is slow: the store keeps it longer than fast ones."
    )

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.tcp, "tcp") if self.tcp else None

    @property
    def tls_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.tls, "tls") if self.tls else None

    @property
    def ws_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.ws, "ws") if self.ws else None

    @property
    def wss_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.wss, "wss") if self.wss else None

    @property
    def allowed_origins(self) -> frozenset[str]:
        return frozenset(item.strip() for item in self.ws_allowed_origins.split(",") if item.strip())

    @property
    def console_address(self) -> tuple[str, int]:
        return parse_host_port(self.console_listen, "console_listen")

    @property
    def console_token_path(self) -> Path:
        return Path(self.console_token_file) if self.console_token_file else self.runtime_dir / "console-token"

    @property
    def insecure_destinations(self) -> frozenset[tuple[str, int]]:
        return frozenset(
            parse_host_port(item.strip(), "tls_insecure_destinations")
            for item in self.tls_insecure_destinations.split(",")
            if item.strip()
        )

    @property
    def runtime_dir(self) -> Path:
        """Where this instance keeps its control socket and files."""
        if self.state_dir:
            base = Path(self.state_dir)
        elif os.environ.get("XDG_RUNTIME_DIR"):
            base = Path(os.environ["XDG_RUNTIME_DIR"]) / "sipwire"
        else:
            base = Path(f"/tmp/sipwire-{os.getuid()}")
        return base / self.instance

    @property
    def control_path(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def offered_digest_algorithms(self) -> tuple[str, ...]:
        """``digest_algorithms`` as a tuple, in the order the challenges are sent."""
        return tuple(item.strip() for item in self.digest_algorithms.split(",") if item.strip())


def descriptions() -> dict[str, str]:
    """Setting name to description, for docs and ``sipwire config``."""
    return {f.name: f.metadata["description"] for f in dataclasses.fields(Settings)}


def parse_host_port(value: str, setting: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[V6]:PORT``; the host must be an IP literal."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"{setting}: {value!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{setting}: host {host!r} in {value!r} is not an IP address") from None
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"{setting}: port {port} in {value!r} is above 65535")
    return host, port


def load(config_file: str | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Layer defaults, TOML file, environment and ``overrides`` (flags); validate."""
    values: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(Settings)}
    if config_file:
        try:
            with open(config_file, "rb") as handle:
                file_values = tomllib.load(handle)
        except OSError as error:
            raise ConfigError(f"cannot read config file {config_file}: {error.strerror}") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {config_file} is not valid TOML: {error}") from error
        unknown = sorted(set(file_values) - set(known))
        if unknown:
            raise ConfigError(f"config file {config_file}: unknown settings {', '.join(unknown)}")
        values.update(file_values)
    for name in known:
        env_value = os.environ.get(f"SIPWIRE_{name.upper()}")
        if env_value is not None:
            values[name] = env_value
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    typed = {name: _coerce(name, known[name].type, value) for name, value in values.items()}
    settings = Settings(**typed)
    _validate(settings)
    return settings


def _coerce(name: str, type_name: Any, value: Any) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}[str(type_name)]
    if kind is str:
        return str(value)
    if kind is bool:
        return _boolean(name, value)
    expected = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or (kind is int and isinstance(value, float)):
        raise ConfigError(f"{name}: {value!r} is not {expected}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not {expected}") from None


#: How a boolean setting may be written in the environment or a file.
BOOLEAN_WORDS: Final = {
    "true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False,
}  # fmt: skip


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in BOOLEAN_WORDS:
        raise ConfigError(f"{name}: {value!r} is not true or false")
    return BOOLEAN_WORDS[word]


def _validate(settings: Settings) -> None:
    if settings.tcp:
        parse_host_port(settings.tcp, "tcp")
    if settings.tls:
        parse_host_port(settings.tls, "tls")
    for name in ("ws", "wss"):
        if getattr(settings, name):
            parse_host_port(getattr(settings, name), name)
    for origin in settings.allowed_origins:
        if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
            raise ConfigError(f"ws_allowed_origins: {origin!r} is not an origin like https://host[:port]")
    _ = settings.insecure_destinations  # parses, so a typo fails at start
    for item in filter(None, (part.strip() for part in settings.source_limits_allow.split(","))):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"source_limits_allow: {item!r} is not an address or network") from None
    if settings.tls_verify_clients not in ("none", "optional", "require"):
        raise ConfigError(f"tls_verify_clients: {settings.tls_verify_clients!r} is not none, optional or require")
    if not 1 <= settings.source_ipv6_prefix <= 128:
        raise ConfigError(f"source_ipv6_prefix: {settings.source_ipv6_prefix} is outside 1..128")
    if not 1 <= settings.max_threads <= 1024:
        raise ConfigError(f"max_threads: {settings.max_threads} is outside 1..1024")
    if not 1 <= settings.threads <= settings.max_threads:
        raise ConfigError(f"threads: {settings.threads} is outside 1..{settings.max_threads} (max_threads)")
    if not 1 <= settings.workers <= 256:
        raise ConfigError(f"workers: {settings.workers} is outside 1..256")
    cpu_set(settings.cpu_affinity)  # raises ConfigError for a list this machine cannot run on
    if not 0 <= settings.busy_poll_us <= MAX_BUSY_POLL_US:
        raise ConfigError(f"busy_poll_us: {settings.busy_poll_us} is outside 0..{MAX_BUSY_POLL_US}")
    positive = (
        "max_connections",
        "max_message_bytes",
        "max_header_bytes",
        "write_queue_bytes",
        "global_write_queue_bytes",
        "dispatch_backlog_bytes",
        "dns_cache_entries",
        "dns_threads",
        "dns_max_pending",
        "max_in_flight_per_connection",
        "max_connections_per_ip",
        "new_connections_per_ip",
        "requests_per_ip",
        "auth_failures_per_ip",
        "auth_failure_window",
        "registrar_min_expires",
        "registrar_max_contacts",
        "ws_max_frame_bytes",
    )
    for name in positive:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name}: {getattr(settings, name)} must be positive")
    for name in (
        "message_timeout",
        "idle_timeout",
        "connect_timeout",
        "shutdown_grace",
        "tls_handshake_timeout",
        "send_timeout",
        "dns_timeout",
        "dns_cache_seconds",
        "dns_negative_cache_seconds",
        "registrar_wait_seconds",
        "registrar_purge_seconds",
        "digest_nonce_seconds",
        "ws_handshake_timeout",
        "ws_ping_interval",
    ):
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{name}: {getattr(settings, name)} must be a positive number of seconds")
    _validate_together(settings)
    _validate_registrar(settings)
    parse_host_port(settings.console_listen, "console_listen")
    for path in settings.console_public_paths.split(","):
        if path.strip() and not path.strip().startswith("/"):
            raise ConfigError(f"console_public_paths: {path.strip()!r} is not a path starting with /")
    if settings.console_jaeger_url and not settings.console_jaeger_url.startswith(("http://", "https://")):
        raise ConfigError(f"console_jaeger_url: {settings.console_jaeger_url!r} is not an http(s) URL")
    if settings.trace_rate_limit < 0:
        raise ConfigError(f"trace_rate_limit: {settings.trace_rate_limit} must be 0 (no limit) or positive")
    if not 100 <= settings.console_trace_spans <= 1_000_000:
        raise ConfigError(f"console_trace_spans: {settings.console_trace_spans} is outside 100..1000000")
    if not 0 <= settings.console_trace_retention <= 86_400:
        raise ConfigError(f"console_trace_retention: {settings.console_trace_retention} is outside 0..86400 seconds")
    if settings.console_trace_slow_ms <= 0:
        raise ConfigError(f"console_trace_slow_ms: {settings.console_trace_slow_ms} must be positive")
    if not MIN_CAPTURE_BYTES <= settings.capture_bytes <= MAX_CAPTURE_BYTES:
        raise ConfigError(
            f"capture_bytes: {settings.capture_bytes} is outside {MIN_CAPTURE_BYTES}..{MAX_CAPTURE_BYTES}"
        )
    if settings.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: {settings.log_level!r} is not debug, info, warning or error")
    if not settings.instance or "/" in settings.instance or settings.instance.startswith("."):
        raise ConfigError(f"instance: {settings.instance!r} must be a plain name")


#: Digest algorithms the proxy can verify (RFC 8760 names).
DIGEST_ALGORITHMS: Final = ("SHA-256", "MD5")


def _validate_registrar(settings: Settings) -> None:
    low, high, default = (
        settings.registrar_min_expires, settings.registrar_max_expires, settings.registrar_default_expires,
    )  # fmt: skip
    if not low <= default <= high:
        raise ConfigError(
            f"registrar_default_expires: {default} is outside registrar_min_expires..registrar_max_expires "
            f"({low}..{high})"
        )
    algorithms = [item.strip() for item in settings.digest_algorithms.split(",") if item.strip()]
    unknown = [item for item in algorithms if item not in DIGEST_ALGORITHMS]
    if not algorithms or unknown:
        raise ConfigError(
            f"digest_algorithms: {settings.digest_algorithms!r} must list some of {', '.join(DIGEST_ALGORITHMS)}"
        )


def _validate_together(settings: Settings) -> None:
    """Limits that only make sense against each other: each message must fit every queue it passes."""
    message = settings.max_message_bytes
    if message > MAX_MESSAGE_BYTES_LIMIT:
        raise ConfigError(
            f"max_message_bytes: {message} exceeds {MAX_MESSAGE_BYTES_LIMIT}, the most a worker channel record carries"
        )
    if settings.max_header_bytes > message:
        raise ConfigError(f"max_header_bytes: {settings.max_header_bytes} exceeds max_message_bytes {message}")
    for name in ("write_queue_bytes", "dispatch_backlog_bytes"):
        if getattr(settings, name) < message:
            raise ConfigError(
                f"{name}: {getattr(settings, name)} is below max_message_bytes {message}: "
                "one message could never pass that queue"
            )
    if settings.global_write_queue_bytes < settings.write_queue_bytes:
        raise ConfigError(
            f"global_write_queue_bytes: {settings.global_write_queue_bytes} is below write_queue_bytes "
            f"{settings.write_queue_bytes} (the per-connection cap)"
        )
