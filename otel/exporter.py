"""The exporter process: span records in on stdin, OTLP out. One per sipwire instance that traces.

Started by :class:`otel.shipper.ProcessDelivery` (in the transport) as
``python -m sipwire.otel.exporter --instance ID`` with the transport's
environment, so the ``OTEL_*`` settings are the transport's. It reads frames
(4-byte big-endian length, the source -- worker index or -1, pid -- and a
:mod:`marshal` dump of a list of records) until stdin closes, builds SDK
spans with the resource of the process that recorded them
(:class:`otel.pipeline.SpanAssembler`) and exports them in batches
(:class:`Batcher`) through the guarded exporters of :mod:`otel.export`. Here,
and only here, the SDK's CPU cost (span objects, OTLP encoding, HTTP or
gRPC) is paid: never in a process that carries SIP traffic.

No batch processor queue sits in between: a batch is exported on this
thread, and stdin is not read meanwhile, so a slow collector fills the pipe
and then the transport's bounded queues, where drops are counted. A batch
leaves when it holds ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` spans or
``OTEL_BSP_SCHEDULE_DELAY`` after its first span. After each export the
running totals (``exported failed``, spans) are written to the status pipe
(``--status-fd``), which the transport reads.

It runs at a lower CPU priority (:data:`NICENESS`) than the SIP processes.
It exits when stdin closes (the transport stopped or died), after exporting
what it holds for at most :data:`STOP_SECONDS`; a corrupt frame also ends it
(the transport starts a new one). SIGINT is ignored: Ctrl-C reaches the
whole process group, and the transport drives the stop.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import marshal
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from sipwire.otel.shipper import MAX_FRAME_BYTES, SOURCE

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

    from sipwire.otel.pipeline import SpanAssembler

log = logging.getLogger("sipwire.telemetry")

#: How long the last export may take once stdin closed (the transport waits a little longer).
STOP_SECONDS: Final = 1.5
#: Export is background work: when the CPU is contended, the processes carrying SIP go first.
#: (Measured on 2 cores at 500 exchanges/s, 100 % sampling: without it, bursts of OTLP encoding
#: showed in the SIP p99.)
NICENESS: Final = 10
_READ_BYTES: Final = 1 << 20


class FrameReader:
    """Frames from a file descriptor, with a timeout (sans buffering surprises: ``os.read`` and ``select``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.ended = False
        self._buffer = bytearray()

    def next(self, timeout: float | None) -> bytes | None:
        """The next frame's body; None when none is complete within ``timeout`` or the stream ended.

        A frame longer than :data:`MAX_FRAME_BYTES` means a corrupt stream: it ends it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended:
            buffer = self._buffer
            if len(buffer) >= 4:
                length = int.from_bytes(buffer[:4], "big")
                if length > MAX_FRAME_BYTES:
                    log.error("telemetry exporter: frame of %d bytes (max %d): corrupt stream", length, MAX_FRAME_BYTES)
                    self.ended = True
                    return None
                if len(buffer) >= 4 + length:
                    frame = bytes(buffer[4 : 4 + length])
                    del buffer[: 4 + length]
                    return frame
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.fd], [], [], wait)[0]:
                return None
            data = os.read(self.fd, _READ_BYTES)
            if not data:
                self.ended = True
                return None
            buffer += data
        return None


class Batcher:
    """Spans waiting for export: a batch leaves when full or ``delay`` seconds after its first span."""

    def __init__(self, exporters: Sequence[SpanExporter], size: int, delay: float, status_fd: int = -1) -> None:
        self.exporters = list(exporters)
        self.size = size
        self.delay = delay
        self.status_fd = status_fd
        self.exported = 0
        self.failed = 0
        self.pending: list[ReadableSpan] = []
        self.due = float("inf")

    def add(self, spans: list[ReadableSpan]) -> None:
        if spans and not self.pending:
            self.due = time.monotonic() + self.delay
        self.pending.extend(spans)

    def timeout(self) -> float | None:
        """Seconds until the pending batch is due; None when nothing waits."""
        return max(0.0, self.due - time.monotonic()) if self.pending else None

    def export_due(self, everything: bool = False) -> None:
        """Export full batches, and the rest when it is due (or ``everything``)."""
        from opentelemetry.sdk.trace.export import SpanExportResult

        while self.pending and (everything or len(self.pending) >= self.size or time.monotonic() >= self.due):
            batch, self.pending = self.pending[: self.size], self.pending[self.size :]
            for exporter in self.exporters:
                if exporter.export(batch) is SpanExportResult.SUCCESS:
                    self.exported += len(batch)
                else:
                    self.failed += len(batch)
            self.report()
        if not self.pending:
            self.due = float("inf")

    def report(self) -> None:
        """Write the running totals (``exported failed``) where the transport reads them."""
        if self.status_fd >= 0:
            with contextlib.suppress(OSError):  # the transport reads when it can; a full pipe skips a line
                os.write(self.status_fd, b"%d %d\n" % (self.exported, self.failed))


def serve(reader: FrameReader, assembler: SpanAssembler, batcher: Batcher) -> int:
    """Build and export the spans of every frame until the stream ends; return the number of frames."""
    frames = 0
    while True:
        frame = reader.next(batcher.timeout())
        if frame is None and reader.ended:
            return frames
        if frame is not None:
            if len(frame) < SOURCE.size:
                log.error("telemetry exporter: frame of %d bytes has no source: stopping", len(frame))
                return frames
            source = SOURCE.unpack_from(frame)
            try:
                records = marshal.loads(frame[SOURCE.size :])
            except (EOFError, ValueError, TypeError) as error:
                log.error("telemetry exporter: undecodable frame (%s): stopping", error)
                return frames
            if isinstance(records, list):
                batcher.add(assembler.build(source, records))
            frames += 1
        batcher.export_due()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sipwire.otel.exporter", description=__doc__)
    parser.add_argument("--instance", required=True, help="the sipwire instance (service.instance.id prefix)")
    parser.add_argument("--status-fd", type=int, default=-1, help="pipe for the running totals (the transport's)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)  # before the SDK's imports, which take a good part of a second of CPU
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s exporter[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from sipwire.otel.config import load
    from sipwire.otel.export import span_exporters
    from sipwire.otel.pipeline import SpanAssembler, run_bounded

    config = load(os.environ)
    exporters = span_exporters(config)
    if args.status_fd >= 0:
        os.set_blocking(args.status_fd, False)
    batcher = Batcher(exporters, config.batch_size, config.schedule_delay, args.status_fd)
    batcher.report()  # ready: the transport waits for this line before its traffic starts
    serve(FrameReader(sys.stdin.fileno()), SpanAssembler([], args.instance), batcher)
    steps = [lambda: batcher.export_due(everything=True), *(exporter.shutdown for exporter in exporters)]
    run_bounded(steps, STOP_SECONDS, "export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
