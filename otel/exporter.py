"""The exporter process: span records in on stdin, OTLP out. One per sipwire process that traces.

Started by :class:`otel.shipper.ProcessDelivery` as
``python -m sipwire.otel.exporter --service NAME --instance ID`` with the parent's
environment, so the ``OTEL_*`` settings are the parent's. It reads frames
(4-byte big-endian length, then a :mod:`marshal` dump of a list of
records) until stdin closes, builds SDK spans (:class:`otel.pipeline.SpanAssembler`)
and hands them to the SDK's batch span processors and the guarded
exporters of :mod:`otel.export`. Here, and only here, the SDK's CPU cost
(span objects, OTLP encoding, HTTP or gRPC) is paid: never in a process
that carries SIP traffic.

It runs at a lower CPU priority (:data:`NICENESS`) than the SIP processes.
It exits when stdin closes (its parent stopped or died), after exporting
what it holds for at most :data:`STOP_SECONDS`; a corrupt frame also ends
it (the parent starts a new one). SIGINT is ignored: Ctrl-C reaches the
whole process group, and the parent drives the stop.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import marshal
import os
import signal
import sys
from typing import TYPE_CHECKING, BinaryIO, Final

from sipwire.otel.shipper import MAX_FRAME_BYTES

if TYPE_CHECKING:
    from sipwire.otel.pipeline import SpanAssembler

log = logging.getLogger("sipwire.telemetry")

#: How long the last export may take once stdin closed (the parent waits a little longer).
STOP_SECONDS: Final = 1.5
#: Export is background work: when the CPU is contended, the processes carrying SIP go first.
#: (Measured on 2 cores at 500 exchanges/s, 100 % sampling: without it, bursts of OTLP encoding
#: showed in the SIP p99.)
NICENESS: Final = 10


def _read_exact(stream: BinaryIO, count: int) -> bytes:
    """``count`` bytes, or fewer at end of stream (bounded: each read returns at least one byte or ends)."""
    chunks: list[bytes] = []
    remaining = count
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def serve(stream: BinaryIO, assembler: SpanAssembler) -> int:
    """Feed every frame of ``stream`` to ``assembler`` until it ends; return the number of frames."""
    frames = 0
    while True:
        header = _read_exact(stream, 4)
        if len(header) < 4:
            return frames
        length = int.from_bytes(header, "big")
        if length > MAX_FRAME_BYTES:
            log.error(
                "telemetry exporter: frame of %d bytes (max %d): corrupt stream, stopping", length, MAX_FRAME_BYTES
            )
            return frames
        payload = _read_exact(stream, length)
        if len(payload) < length:
            return frames
        try:
            records = marshal.loads(payload)
        except (EOFError, ValueError, TypeError) as error:
            log.error("telemetry exporter: undecodable frame (%s): stopping", error)
            return frames
        if isinstance(records, list):
            assembler.feed(records)
        frames += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sipwire.otel.exporter", description=__doc__)
    parser.add_argument("--service", required=True, help="service.name of the spans (sipwire-transport, ...)")
    parser.add_argument("--instance", required=True, help="service.instance.id prefix")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)  # before the SDK's imports, which take a good part of a second of CPU
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {args.service}-exporter[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from sipwire.otel import attributes as attr
    from sipwire.otel.config import load
    from sipwire.otel.export import span_exporters
    from sipwire.otel.pipeline import SpanAssembler

    config = load(os.environ)
    processors = [BatchSpanProcessor(exporter) for exporter in span_exporters(config)]
    assembler = SpanAssembler(processors, attr.resource(args.service, args.instance, os.getppid()))
    serve(sys.stdin.buffer, assembler)
    assembler.shutdown(STOP_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
