"""Process entry points: start telemetry as the ``OTEL_*`` variables ask, importing the SDK only then."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sipwire.otel.config import load

if TYPE_CHECKING:
    from sipwire.otel.pipeline import Telemetry
    from sipwire.otel.worker import RouteTracing

log = logging.getLogger("sipwire.telemetry")


def transport_telemetry(
    instance: str, read_statistics: Callable[[], Mapping[str, Any]] | None = None, rate_limit: int = 0
) -> Telemetry | None:
    """The transport's telemetry, started; None (and no SDK import) when nothing is configured.

    ``rate_limit``: traces started per second at most (0: no limit; the ``trace_rate_limit`` setting).

    ``read_statistics`` (the transport's statistics, see :class:`otel.metrics.TransportMetrics`) feeds the
    metrics; without it only traces are recorded.
    """
    config = load(os.environ)
    for warning in config.warnings:
        log.warning("telemetry: %s", warning)
    if not config.enabled:
        return None
    from sipwire.otel import attributes as attr
    from sipwire.otel import logs
    from sipwire.otel.metrics import TransportMetrics
    from sipwire.otel.pipeline import Telemetry
    from sipwire.otel.recorder import SpanRecorder
    from sipwire.otel.shipper import ProcessDelivery

    metrics = None
    if config.metrics and read_statistics is not None:
        metrics = TransportMetrics.start(config, attr.resource(attr.SERVICE_TRANSPORT, instance), read_statistics)
    recorder = SpanRecorder(
        config.root_ratio, config.queue_size, tracing=config.tracing, metrics=metrics is not None, rate_limit=rate_limit
    )
    telemetry = Telemetry(recorder, ProcessDelivery(instance), metrics)
    telemetry.start()
    if config.tracing:
        logs.install()
    log.info(
        "telemetry: traces %s (sampler %s, ratio %g), metrics %s",
        ",".join(config.traces_exporters) or "off", config.sampler, config.root_ratio,
        ",".join(config.metrics_exporters) or "off",
    )  # fmt: skip
    return telemetry


def worker_tracing() -> RouteTracing | None:
    """A worker's route tracing when traces are configured; None (and no SDK import) otherwise.

    The worker starts no thread and no exporter: its loop ships the recorded spans to the
    transport over its channels. The tracer provider becomes the process's global one, so
    routers may make their own spans with the OpenTelemetry API: they nest under ``sip.route``.
    """
    config = load(os.environ)
    if not config.tracing:
        return None
    from opentelemetry import trace

    from sipwire.otel import logs
    from sipwire.otel.recorder import SpanRecorder
    from sipwire.otel.worker import RouteTracing

    # The transport sampled already: the worker records every traced message it gets.
    tracing = RouteTracing(SpanRecorder(1.0, config.queue_size))
    trace.set_tracer_provider(tracing.provider)
    logs.install()
    return tracing
