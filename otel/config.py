"""The telemetry settings, read once from the standard ``OTEL_*`` environment variables.

No OpenTelemetry import here: the transport reads this at start and, when
nothing is configured, never loads the SDK at all.

What turns tracing on
    ``OTEL_TRACES_EXPORTER`` naming an exporter (``otlp``, ``console``; a
    comma-separated list is allowed), or, when that variable is unset, an
    OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). Unlike the SDK's own default
    (``otlp``), nothing configured means tracing is off: a SIP server must not
    start sending telemetry to localhost:4318 because nobody said otherwise.
    ``OTEL_SDK_DISABLED=true`` turns everything off.
What turns metrics on
    ``OTEL_METRICS_EXPORTER`` naming an exporter, or
    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``. A shared
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone does not: Jaeger, the usual target,
    accepts traces only.
Protocol
    ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL``, else
    ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` (default) or ``grpc``.
    Endpoints, headers, timeouts and compression are read by the SDK's own
    exporters.
Batches
    ``OTEL_BSP_MAX_QUEUE_SIZE`` bounds each of the transport's span queues;
    the exporter process sends a batch when it holds
    ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` spans (512) or
    ``OTEL_BSP_SCHEDULE_DELAY`` ms after its first span (500 here, not the
    SDK's 5000: a trace should reach the console while someone looks for it).
Sampling
    ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``. A received message
    has no parent, so the transport applies the sampler's root rule:
    ``always_on``/``parentbased_always_on`` keep every trace,
    ``always_off``/``parentbased_always_off`` none, ``traceidratio`` and
    ``parentbased_traceidratio`` the fraction given by the argument (same
    trace-id rule as the SDK's ``TraceIdRatioBased``). Every other span of the
    trace follows that decision.

Bad values never stop the transport: they are reported in
:attr:`TelemetryConfig.warnings` and the documented default is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

#: Exporter names understood here (the ``OTEL_*_EXPORTER`` values); ``none`` means off.
KNOWN_EXPORTERS: Final = frozenset({"otlp", "console"})
PROTOCOLS: Final = frozenset({"http/protobuf", "grpc"})
DEFAULT_PROTOCOL: Final = "http/protobuf"
#: The SDK's batch processor queue default; the transport's record queue uses the same bound.
DEFAULT_QUEUE_SIZE: Final = 2048
DEFAULT_BATCH_SIZE: Final = 512
DEFAULT_SCHEDULE_DELAY_MS: Final = 500

_ROOT_RATIOS: Final = {
    "always_on": 1.0,
    "parentbased_always_on": 1.0,
    "always_off": 0.0,
    "parentbased_always_off": 0.0,
}
_RATIO_SAMPLERS: Final = frozenset({"traceidratio", "parentbased_traceidratio"})


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What the ``OTEL_*`` variables ask for; see the module docstring."""

    traces_exporters: tuple[str, ...] = ()
    metrics_exporters: tuple[str, ...] = ()
    traces_protocol: str = DEFAULT_PROTOCOL
    metrics_protocol: str = DEFAULT_PROTOCOL
    sampler: str = "parentbased_always_on"
    #: Probability that a received message starts a recorded trace.
    root_ratio: float = 1.0
    queue_size: int = DEFAULT_QUEUE_SIZE
    batch_size: int = DEFAULT_BATCH_SIZE
    #: Seconds a span waits in the exporter for its batch to fill.
    schedule_delay: float = DEFAULT_SCHEDULE_DELAY_MS / 1000.0
    warnings: tuple[str, ...] = ()

    @property
    def tracing(self) -> bool:
        return bool(self.traces_exporters)

    @property
    def metrics(self) -> bool:
        return bool(self.metrics_exporters)

    @property
    def enabled(self) -> bool:
        return self.tracing or self.metrics


def load(environ: Mapping[str, str]) -> TelemetryConfig:
    """Read the telemetry settings from ``environ`` (normally ``os.environ``)."""
    warnings: list[str] = []
    if _get(environ, "OTEL_SDK_DISABLED").lower() == "true":
        return TelemetryConfig()
    traces = _exporters(
        environ, "OTEL_TRACES_EXPORTER", ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), warnings
    )
    metrics = _exporters(environ, "OTEL_METRICS_EXPORTER", ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",), warnings)
    sampler, ratio = _sampler(environ, warnings)
    return TelemetryConfig(
        traces_exporters=traces,
        metrics_exporters=metrics,
        traces_protocol=_protocol(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", warnings),
        metrics_protocol=_protocol(environ, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", warnings),
        sampler=sampler,
        root_ratio=ratio,
        queue_size=_positive_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_QUEUE_SIZE, warnings),
        batch_size=_positive_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_BATCH_SIZE, warnings),
        schedule_delay=_positive_int(environ, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY_MS, warnings) / 1000.0,
        warnings=tuple(dict.fromkeys(warnings)),  # the shared protocol variable may be read twice
    )


def _get(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _exporters(
    environ: Mapping[str, str], variable: str, endpoints: tuple[str, ...], warnings: list[str]
) -> tuple[str, ...]:
    value = _get(environ, variable)
    if not value:
        return ("otlp",) if any(_get(environ, name) for name in endpoints) else ()
    names: list[str] = []
    for raw in value.split(","):
        name = raw.strip().lower()
        if not name or name == "none":
            continue
        if name not in KNOWN_EXPORTERS:
            warnings.append(f"{variable}: exporter {name!r} is not supported here (use otlp or console); ignored")
            continue
        if name not in names:
            names.append(name)
    return tuple(names)


def _protocol(environ: Mapping[str, str], variable: str, warnings: list[str]) -> str:
    name = variable
    value = _get(environ, variable)
    if not value:
        name = "OTEL_EXPORTER_OTLP_PROTOCOL"
        value = _get(environ, name)
    if not value:
        return DEFAULT_PROTOCOL
    if value not in PROTOCOLS:
        warnings.append(f"{name}={value!r} is not supported (use http/protobuf or grpc); using {DEFAULT_PROTOCOL}")
        return DEFAULT_PROTOCOL
    return value


def _sampler(environ: Mapping[str, str], warnings: list[str]) -> tuple[str, float]:
    name = _get(environ, "OTEL_TRACES_SAMPLER").lower() or "parentbased_always_on"
    if name in _ROOT_RATIOS:
        return name, _ROOT_RATIOS[name]
    if name not in _RATIO_SAMPLERS:
        warnings.append(f"OTEL_TRACES_SAMPLER={name!r} is not a known sampler; using parentbased_always_on")
        return "parentbased_always_on", 1.0
    argument = _get(environ, "OTEL_TRACES_SAMPLER_ARG")
    if not argument:
        return name, 1.0
    try:
        ratio = float(argument)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        warnings.append(f"OTEL_TRACES_SAMPLER_ARG={argument!r} is not a probability in [0, 1]; using 1.0")
        return name, 1.0
    return name, ratio


def _positive_int(environ: Mapping[str, str], variable: str, default: int, warnings: list[str]) -> int:
    value = _get(environ, variable)
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        warnings.append(f"{variable}={value!r} is not a positive integer; using {default}")
        return default
    return number
