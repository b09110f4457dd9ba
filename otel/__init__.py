"""OpenTelemetry for sipwire: traces (and metrics) of the transport and its workers.

Everything is configured from the standard ``OTEL_*`` environment variables
(:mod:`otel.config`); with no exporter configured, which is the default,
tracing is off and the data path pays nothing for it.

One trace per received message::

    sip.receive   (transport, I/O thread: the read that completed the message, framing, dispatch)
      sip.route   (worker: parse and routing; context from the MESSAGE record's trace_context)
        sip.write (transport: one per write job, ends with the job's outcome)
          tcp.connect, tls.handshake (when the job opened a connection)

The transport's I/O threads never build spans: :class:`otel.recorder.SpanRecorder`
only decides sampling, makes ids and appends plain tuples to a bounded
queue; a telemetry thread (:mod:`otel.pipeline`) turns them into SDK spans
and hands them to a batch span processor. A full queue drops and counts;
exporter failures are logged once and never reach SIP traffic.

Modules:
    config    -- the OTEL_* settings, read once (no SDK import)
    recorder  -- the I/O threads' side: sampling, ids, traceparent, the bounded queue (no SDK import)
    export    -- span and metric exporters from the settings, guarded so a failing collector is logged once
    pipeline  -- the transport's telemetry thread: records to spans, metrics of the transport
    worker    -- the worker's routing span, context in and out over the W3C propagator
"""
