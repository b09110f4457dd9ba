"""Exporters from the settings, wrapped so that a failing collector is logged once and never blocks SIP.

The SDK's OTLP exporters retry with back-off and log every failed attempt.
Here every export runs on a telemetry thread (never an I/O thread), and a
collector that is down produces exactly one warning per outage:

* :class:`GuardedSpanExporter` / :class:`GuardedMetricExporter` wrap the real
  exporter; the first failed batch of an outage is logged (with the SDK's own
  reason), later ones are only counted, and the first success afterwards is
  logged at INFO with the count. Batches that fail are dropped.
* :class:`_QuietSdkLogs`, installed on the SDK exporter loggers, keeps their
  per-attempt records out of the log and remembers the last one as the
  reason for the guard's single warning. The batch processor's "queue full"
  warning passes once per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Final

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sipwire.otel.config import TelemetryConfig

log = logging.getLogger("sipwire.telemetry")

#: Loggers of the SDK exporters whose per-attempt failure records are summarised by the guards.
_EXPORTER_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)
#: The batch processor's logger ("Queue full, dropping Span." and export exceptions).
_PROCESSOR_LOGGERS: Final = ("opentelemetry.sdk._shared_internal",)


class _QuietSdkLogs(logging.Filter):
    """Swallow the SDK exporters' records, remembering the last one; let each distinct processor record pass once."""

    def __init__(self) -> None:
        super().__init__()
        self._recent: list[str] = []  # the SDK's reasons since the guard last took them (at most 2)
        self._seen: set[tuple[str, object]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in _PROCESSOR_LOGGERS:
            key = (record.name, record.msg)
            with self._lock:
                if key in self._seen:
                    return False
                self._seen.add(key)
            return True
        if record.levelno >= logging.WARNING:
            message = record.getMessage()[:300]
            with self._lock:
                if message not in self._recent:
                    self._recent = [*self._recent, message][-2:]
        return False

    def take(self) -> str:
        """The SDK's last reasons (cause first, e.g. the refused connection, then the give-up), and forget them."""
        with self._lock:
            recent, self._recent = self._recent, []
        return "; ".join(recent)


_QUIET = _QuietSdkLogs()


def quiet_sdk_logs() -> None:
    """Install the filter on the SDK's exporter and processor loggers (idempotent)."""
    for name in (*_EXPORTER_LOGGERS, *_PROCESSOR_LOGGERS):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


class _Outage:
    """Failure bookkeeping shared by the span and metric guards."""

    def __init__(self, signal: str, target: str) -> None:
        self.signal = signal
        self.target = target
        self.failed_batches = 0
        self.failed_items = 0
        self._failing = False

    def failed(self, items: int, detail: str) -> None:
        self.failed_batches += 1
        self.failed_items += items
        if not self._failing:
            self._failing = True
            log.warning(
                "telemetry: exporting %s to %s failed (%s); dropping them, further failures are counted, not logged",
                self.signal, self.target, detail or _QUIET.take() or "no reason given",
            )  # fmt: skip

    def succeeded(self) -> None:
        _QUIET.take()
        if self._failing:
            self._failing = False
            log.info(
                "telemetry: exporting %s to %s works again (%d batches, %d items dropped so far)",
                self.signal, self.target, self.failed_batches, self.failed_items,
            )  # fmt: skip


class GuardedSpanExporter(SpanExporter):
    """A span exporter whose failures are logged once per outage and never raised; see the module docstring."""

    def __init__(self, inner: SpanExporter, target: str) -> None:
        self.inner = inner
        self.outage = _Outage("spans", target)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        detail = ""
        try:
            result = self.inner.export(spans)
        except Exception as error:  # a broken exporter must not kill the processor's thread
            result, detail = SpanExportResult.FAILURE, f"{type(error).__name__}: {error}"
        if result is SpanExportResult.SUCCESS:
            self.outage.succeeded()
        else:
            self.outage.failed(len(spans), detail)
        return result

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception as error:
            log.warning("telemetry: span exporter shutdown failed: %s", error)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception:
            return False


class GuardedMetricExporter(MetricExporter):
    """A metric exporter whose failures are logged once per outage and never raised."""

    def __init__(self, inner: MetricExporter, target: str) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.outage = _Outage("metrics", target)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        detail = ""
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as error:
            result, detail = MetricExportResult.FAILURE, f"{type(error).__name__}: {error}"
        if result is MetricExportResult.SUCCESS:
            self.outage.succeeded()
        else:
            self.outage.failed(len(metrics_data.resource_metrics), detail)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception:
            return False

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        try:
            self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)
        except Exception as error:
            log.warning("telemetry: metric exporter shutdown failed: %s", error)


def span_exporters(config: TelemetryConfig) -> list[GuardedSpanExporter]:
    """One guarded exporter per name in ``OTEL_TRACES_EXPORTER`` (endpoints and options from the SDK's env)."""
    quiet_sdk_logs()
    exporters: list[GuardedSpanExporter] = []
    for name in config.traces_exporters:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(GuardedSpanExporter(ConsoleSpanExporter(), "console"))
        elif config.traces_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

            grpc_exporter = GrpcSpanExporter()
            exporters.append(GuardedSpanExporter(grpc_exporter, f"OTLP/gRPC {grpc_exporter._endpoint}"))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

            http_exporter = HttpSpanExporter()
            exporters.append(GuardedSpanExporter(http_exporter, f"OTLP/HTTP {http_exporter._endpoint}"))
    return exporters


def metric_exporters(config: TelemetryConfig) -> list[GuardedMetricExporter]:
    """One guarded exporter per name in ``OTEL_METRICS_EXPORTER``."""
    quiet_sdk_logs()
    exporters: list[GuardedMetricExporter] = []
    for name in config.metrics_exporters:
        if name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            exporters.append(GuardedMetricExporter(ConsoleMetricExporter(), "console"))
        elif config.metrics_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )

            grpc_exporter = GrpcMetricExporter()
            exporters.append(GuardedMetricExporter(grpc_exporter, f"OTLP/gRPC {grpc_exporter._endpoint}"))
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )

            http_exporter = HttpMetricExporter()
            exporters.append(GuardedMetricExporter(http_exporter, f"OTLP/HTTP {http_exporter._endpoint}"))
    return exporters
