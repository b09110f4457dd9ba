"""OpenTelemetry for sipwire: traces (and metrics) of the transport and its workers.

Everything is configured from the standard ``OTEL_*`` environment variables
(:mod:`otel.config`); with no exporter configured, which is the default,
tracing is off and the data path pays nothing for it.

One trace per received message::

    sip.receive   (transport, I/O thread: the read that completed the message, framing, dispatch)
      sip.route   (worker: parse and routing; context from the MESSAGE record's trace_context)
        sip.write (transport: one per write job, ends with the job's outcome)
          tcp.connect, tls.handshake (when the job opened a connection)

No process that carries SIP builds or exports an SDK span. The transport's
I/O threads (and the worker's loop) only decide sampling, make ids and
append plain tuples to a bounded queue (:class:`otel.recorder.SpanRecorder`).
Workers send theirs to the transport over their channels (SPANS records);
the transport's telemetry thread ships both, in batches, to the instance's
one exporter process, niced, where the SDK builds the spans and they are
exported over OTLP: Jaeger and the console get whole traces from one place.
Every queue is bounded and drops and counts when full (``telemetry.*``
transport counters); exporter failures are logged once per outage and never
reach SIP traffic. Log lines of a traced message carry its ids (:mod:`otel.logs`).

Modules:
    config    -- the OTEL_* settings, read once (no SDK import)
    recorder  -- the I/O threads' side: sampling, ids, traceparent, the bounded queue (no SDK import)
    pipeline  -- the telemetry thread, and records to SDK spans (SpanAssembler)
    shipper   -- the pipe to the exporter process, and its totals read back
    exporter  -- the exporter process (python -m sipwire.otel.exporter): frames in, batches out
    logs      -- trace_id/span_id on the log lines of a traced message
    export    -- span and metric exporters from the settings, guarded so a failing collector is logged once
    metrics   -- the transport's metrics, read from its own counters
    worker    -- the worker's routing span, and its spans' batches for the SPANS records
    attributes-- semantic-convention names and the resource of each process
    setup     -- entry points for the transport and the worker (import the SDK only when configured)
"""
