"""Transport metrics over OpenTelemetry: read from the counters the transport keeps anyway.

Nothing here runs on an I/O thread. Counts and gauges are observable
instruments whose callbacks run on the SDK's periodic reader thread and read
the transport's own statistics (one snapshot per collection, shared by every
callback). The TLS handshake duration is a real histogram: the I/O thread
appends (seconds, facts) to :attr:`otel.recorder.SpanRecorder.handshakes`
(bounded, like the span queue) and the telemetry thread records them.

Instruments (names and units after the semantic conventions' rules: a
namespace, no ``_total``, UCUM units, ``{annotation}`` for counted things):

=====================================  ====================  ==========================================
name                                   instrument, unit      attributes
=====================================  ====================  ==========================================
``sipwire.active_connections``         up-down, {connection}
``sipwire.connections.opened``         counter, {connection}  ``sip.transport``, ``sipwire.connection.direction``
``sipwire.rejected_connections``       counter, {connection}  ``error.type``
``sipwire.messages.received``          counter, {message}
``sipwire.messages.lost``              counter, {message}
``sipwire.write_jobs``                 counter, {job}         ``sipwire.write.outcome``, ``error.type`` on failure
``sipwire.pending_write_bytes``        up-down, By
``sipwire.tls_handshake.duration``     histogram, s           ``tls.protocol.version``, ``error.type`` on failure
=====================================  ====================  ==========================================
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from opentelemetry.metrics import CallbackOptions, Histogram, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from sipwire.otel import attributes as attr
from sipwire.otel.config import TelemetryConfig
from sipwire.otel.export import metric_exporters

#: Handshake duration buckets in seconds (loopback handshakes take about a millisecond).
HANDSHAKE_BUCKETS_S: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
#: Callbacks of one collection share one statistics read made at most this long ago.
_READ_CACHE_SECONDS: Final = 1.0

#: Returns the transport's statistics: ``counters`` (name -> count), ``connections``, ``pending_write_bytes``.
Reader = Callable[[], Mapping[str, Any]]

log = logging.getLogger("sipwire.telemetry")


class TransportMetrics:
    """The meter provider and instruments of the transport process."""

    def __init__(self, provider: MeterProvider, read_statistics: Reader) -> None:
        self.provider = provider
        self._read_statistics = read_statistics
        self._read_failed = False
        self._lock = threading.Lock()
        self._cached_at = -_READ_CACHE_SECONDS
        self._counters: Mapping[str, int] = {}
        self._gauges: Mapping[str, int] = {}
        meter = provider.get_meter(attr.SCOPE_NAME, attr.SCOPE_VERSION)
        meter.create_observable_up_down_counter(
            "sipwire.active_connections", [self._active], "{connection}", "Open connections, both directions."
        )
        meter.create_observable_counter(
            "sipwire.connections.opened", [self._opened], "{connection}", "Connections accepted or opened."
        )
        meter.create_observable_counter(
            "sipwire.rejected_connections", [self._rejected], "{connection}", "Connections refused at a limit."
        )
        meter.create_observable_counter(
            "sipwire.messages.received", [self._received], "{message}", "Complete SIP messages framed."
        )
        meter.create_observable_counter(
            "sipwire.messages.lost", [self._lost], "{message}", "Messages lost with a worker or a full park buffer."
        )
        meter.create_observable_counter("sipwire.write_jobs", [self._write_jobs], "{job}", "Write jobs by outcome.")
        meter.create_observable_up_down_counter(
            "sipwire.pending_write_bytes", [self._pending], "By", "Bytes queued for writing on all connections."
        )
        self.handshake_duration: Histogram = meter.create_histogram(
            "sipwire.tls_handshake.duration",
            unit="s",
            description="TLS handshake duration, accepted and opened connections.",
            explicit_bucket_boundaries_advisory=HANDSHAKE_BUCKETS_S,
        )

    @classmethod
    def start(cls, config: TelemetryConfig, resource: Resource, read_statistics: Reader) -> TransportMetrics:
        readers = [PeriodicExportingMetricReader(exporter) for exporter in metric_exporters(config)]
        provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
        return cls(provider, read_statistics)

    def record_handshake(self, seconds: float, version: str, error: str) -> None:
        attributes: attr.Attributes = {}
        if version:
            attributes[attr.TLS_PROTOCOL_VERSION] = attr.tls_version(version)
        if error:
            attributes[attr.ERROR_TYPE] = error
        self.handshake_duration.record(seconds, attributes)

    def shutdown(self) -> None:
        self.provider.shutdown()

    # -- observable callbacks (SDK reader thread) ------------------------------------------------

    def _read(self) -> tuple[Mapping[str, int], Mapping[str, int]]:
        with self._lock:
            now = time.monotonic()
            if now - self._cached_at >= _READ_CACHE_SECONDS:
                self._cached_at = now
                try:
                    statistics = self._read_statistics()
                except Exception as error:  # keep the last figures; say so once
                    if not self._read_failed:
                        log.warning("telemetry: cannot read transport statistics for metrics: %s", error)
                    self._read_failed = True
                    return self._counters, self._gauges
                self._read_failed = False
                self._counters = dict(statistics.get("counters", {}))
                self._gauges = {
                    "connections": int(statistics.get("connections", 0)),
                    "pending_write_bytes": int(statistics.get("pending_write_bytes", 0)),
                }
            return self._counters, self._gauges

    def _active(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._read()[1].get("connections", 0))]

    def _pending(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._read()[1].get("pending_write_bytes", 0))]

    def _opened(self, _options: CallbackOptions) -> Iterable[Observation]:
        counters = self._read()[0]
        return [
            *(
                Observation(counters.get(f"accepted.{name}", 0), {attr.SIP_TRANSPORT: name, _DIRECTION: "inbound"})
                for name in ("tcp", "tls", "ws", "wss")
            ),
            Observation(counters.get("connects", 0), {_DIRECTION: "outbound"}),
        ]

    def _rejected(self, _options: CallbackOptions) -> Iterable[Observation]:
        counters = self._read()[0]
        return [
            Observation(value, {attr.ERROR_TYPE: name.partition(".")[2]})
            for name, value in counters.items()
            if name.startswith("refused.")
        ]

    def _received(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._read()[0].get("messages_in", 0))]

    def _lost(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._read()[0].get("lost_messages", 0))]

    def _write_jobs(self, _options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for name, value in self._read()[0].items():
            if name.startswith("write."):
                label = name[6:]
                attributes: attr.Attributes = {_OUTCOME: label}
                if label != "sent":
                    attributes[attr.ERROR_TYPE] = label
                observations.append(Observation(value, attributes))
        return observations


_DIRECTION: Final = "sipwire.connection.direction"
_OUTCOME: Final = "sipwire.write.outcome"
