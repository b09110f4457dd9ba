"""A SIP worker process: full parse, routing, write jobs. It never touches a peer socket.

The transport starts each worker as ``python -m sipwire.transport.worker`` with one
inherited control socket. Over it the transport passes, with SCM_RIGHTS,
one channel socket per I/O thread (see :mod:`transport.wire`), and later
asks the worker to stop; the worker says over it when it is ready to route.
Messages arrive on those channels; a router's replies go back on the channel
the message came from, so they land in the selector of the I/O thread that
owns the connection.

The worker exits when its control socket closes, so it never outlives the
transport. Ctrl-C reaches the whole process group; the worker ignores
SIGINT and lets the transport drive an orderly stop. What a router's context
sends (write jobs, counters, closes) is the :class:`~sipwire.transport.workerjobs.WriteJobs` layer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from sipwire.config import Settings
from sipwire.otel import logs
from sipwire.otel.setup import worker_tracing
from sipwire.transport.poller import READ, Poller
from sipwire.transport.ratelog import RateLimitedLog
from sipwire.transport.readbuffer import ReadBuffer
from sipwire.transport.resolver import Resolver, ResolverLimits
from sipwire.transport.routing import (
    Envelope,
    Outcome,
    OutcomeCallback,
    RouteContext,
    Router,
    load_router,
)
from sipwire.transport.sip import SipParseError, parse
from sipwire.transport.sipresponse import build_response, response_for_unparsable
from sipwire.transport.stages import WorkerStages, min_timeout
from sipwire.transport.tlsinfo import TlsInfo
from sipwire.transport.wire import (
    MAX_SPANS_BYTES,
    ConnectionsClosedRecord,
    MessageRecord,
    OutcomeRecord,
    WireError,
    encode_count,
    encode_done,
    encode_spans,
    encode_stages_record,
)
from sipwire.transport.workerjobs import WorkerChannel, WriteJobs

if TYPE_CHECKING:
    from sipwire.otel.worker import RouteSpan, RouteTracing

log = logging.getLogger("sipwire.worker")

#: Control messages, ``!BH`` command, thread index: ADD_CHANNEL and STOP from the transport, READY from the worker.
CONTROL = struct.Struct("!BH")
CONTROL_ADD_CHANNEL = 1
CONTROL_STOP = 2
CONTROL_READY = 3

RECV_BYTES = 262144
#: Peer text quoted in a log line is cut here: enough to recognise the message, too short to flood.
MAX_LOGGED_PEER_CHARS: Final = 120

#: What a request whose router raised is answered with (status 500).
ROUTER_FAILED_REASON: Final = "Server Internal Error (router failed)"

#: Counters a worker reports to the transport (COUNT records): a fixed set, never peer text.
COUNT_ROUTER_ERRORS: Final = "router_errors"
COUNT_UNPARSABLE_ANSWERED: Final = "sip_parse_error.answered"
COUNT_UNPARSABLE_CLOSED: Final = "sip_parse_error.closed"
COUNT_UNPARSABLE_RESPONSE: Final = "sip_parse_error.response_dropped"
COUNT_SPANS_DROPPED: Final = "telemetry.dropped_worker_queue_full"  # spans the worker could not queue or ship


class Worker(WriteJobs):
    """Reads channel records, runs the router, writes back jobs and done counts."""

    def __init__(
        self,
        index: int,
        control: socket.socket,
        route: Router,
        resolver: Resolver,
        tracing: RouteTracing | None = None,
        connections_closed: Callable[[list[int], Callable[[str], None]], None] | None = None,
        busy_poll_us: int = 0,
    ) -> None:
        self.index = index
        self._busy_poll = busy_poll_us / 1e6
        self._control = control
        self._route = route
        self._connections_closed = connections_closed
        self._selector = Poller()
        self._selector.register(control, READ, None)
        self._resolver = resolver
        self._selector.register(resolver.wake_fd, READ, resolver)
        self._channels: dict[int, WorkerChannel] = {}
        self._current: WorkerChannel | None = None
        self._next_job = 1
        self._callbacks: dict[int, OutcomeCallback] = {}
        self._deferred: list[Callable[[], None]] = []
        self._running = True
        self._ratelog = RateLimitedLog(log)
        self._reader = ReadBuffer(RECV_BYTES)
        self._tracing = tracing
        # While a traced message is routed: its span, and the traceparent its write jobs carry.
        self._span: RouteSpan | None = None
        self._trace_context = ""
        # Traced jobs whose outcome callback is pending: the context its own writes get.
        self._callback_contexts: dict[int, str] = {}
        self._stages = WorkerStages()
        self._pid = os.getpid()
        self._spans_dropped = 0  # already reported in COUNT records

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> None:
        # Imports and the router's setup are done: the transport opens its listeners once every worker says so.
        with contextlib.suppress(OSError):
            self._control.send(CONTROL.pack(CONTROL_READY, 0))
        resolver = self._resolver
        select = self._selector.select
        busy_poll = self._busy_poll
        poll_until = 0.0  # busy_poll: after sending records, poll rather than sleep until then
        while self._running:
            now = time.monotonic()
            report_in = self._stages.seconds_to_report(now) if self._channels else None  # no channel: nobody to tell
            timeout = min_timeout(resolver.seconds_to_next_deadline(), report_in)
            if poll_until and now < poll_until:
                timeout = 0.0
            answered = False  # a lookup finished (its eventfd): collect it; while any waits, collect timeouts
            for data, _ in select(timeout):
                if data is None:
                    self._read_control()
                elif data is resolver:
                    answered = True
                else:
                    self._read_channel(data)
            if answered or resolver.waiting:
                resolver.collect()
            while self._deferred:
                self._deferred.pop(0)()
            if self._flush() and busy_poll:
                poll_until = time.monotonic() + busy_poll
        for channel in list(self._channels.values()):
            self._close_channel(channel)

    def _read_control(self) -> None:
        try:
            message, fds, _, _ = socket.recv_fds(self._control, CONTROL.size, 1)
        except OSError:
            message, fds = b"", []
        if len(message) < CONTROL.size:
            self._running = False  # the transport is gone: never outlive it
            return
        command, thread_index = CONTROL.unpack(message)
        if command == CONTROL_ADD_CHANNEL and fds:
            old = self._channels.get(thread_index)
            if old is not None:
                self._close_channel(old)
            channel = WorkerChannel(thread_index, socket.socket(fileno=fds[0]))
            self._channels[thread_index] = channel
            self._selector.register(channel.sock, READ, channel)
        elif command == CONTROL_STOP:
            self._running = False

    def _close_channel(self, channel: WorkerChannel) -> None:
        if self._channels.get(channel.thread_index) is channel:
            del self._channels[channel.thread_index]
        self._selector.forget(channel.sock)  # its close, next, takes it out of the epoll set
        channel.sock.close()

    def _read_channel(self, channel: WorkerChannel) -> None:
        try:
            data = self._reader.recv(channel.sock)
        except OSError:
            data = b""
        if not data:
            self._close_channel(channel)  # that I/O thread retired
            return
        try:
            records = channel.reader.feed(data)
        except WireError as error:
            log.error(
                "worker %d: corrupt channel from I/O thread %d: %s; exiting so that the transport restarts this "
                "worker with new channels", self.index, channel.thread_index, error,
            )  # fmt: skip
            self._running = False
            return
        done: dict[int, int] = defaultdict(int)
        self._current = channel
        stages = self._stages
        for record in records:
            if isinstance(record, MessageRecord):
                started = time.time()  # the clock of received_at, which the transport stamped when it framed
                stages.queue_wait.observe(max(started - record.received_at, 0.0) * 1000.0)
                self._handle_message(record)
                stages.routing.observe(max(time.time() - started, 0.0) * 1000.0)  # 0 if the clock stepped back
                done[record.conn_id] += 1
            elif isinstance(record, OutcomeRecord):
                callback = self._callbacks.pop(record.job_id, None)
                if callback is not None:
                    # Writes made by the callback belong to the trace of the job it answers.
                    if self._callback_contexts:
                        self._trace_context = self._callback_contexts.pop(record.job_id, "")
                        logs.enter_context(self._trace_context)
                    self._run_callback(callback, Outcome(record.job_id, record.conn_id, record.result, record.reason))
                    if self._trace_context:
                        logs.leave()
                        self._trace_context = ""
            elif isinstance(record, ConnectionsClosedRecord) and self._connections_closed is not None:
                try:
                    self._connections_closed(list(record.conn_ids), self.count)
                except Exception as error:
                    self._router_failed(error, f"in connections_closed for {len(record.conn_ids)} connections")
        self._current = None
        for conn_id, count in done.items():
            channel.out.append(encode_done(conn_id, count))

    def _handle_message(self, record: MessageRecord) -> None:
        tracing = self._tracing
        span = tracing.start_route(record) if tracing is not None and record.trace_context else None
        if span is None or tracing is None:
            self._route_message(record)
            return
        self._span = span
        self._trace_context = span.traceparent
        logs.enter(span.trace_id, span.span_id)
        try:
            with tracing.current(span):
                self._route_message(record)
        finally:
            logs.leave()
            self._span = None
            self._trace_context = ""
            tracing.end(span)

    def _route_message(self, record: MessageRecord) -> None:
        envelope = Envelope(
            record.conn_id,
            record.transport,
            record.local,
            record.remote,
            record.received_at,
            record.trace_context,
            TlsInfo.decode(record.tls),
        )
        ctx = RouteContext(envelope, self)
        try:
            message = parse(record.raw)
        except SipParseError as error:
            self._unparsable(record, ctx, error)
            return
        if self._span is not None and self._tracing is not None:
            self._tracing.parsed(self._span, message)
        try:
            self._route(message, ctx)
        except Exception as error:
            if self._span is not None and self._tracing is not None:
                self._tracing.failed(self._span, type(error).__qualname__, f"router failed: {error}")
            self._router_failed(error, f"on {_quoted(message.start_line)} from conn {record.conn_id}")
            if message.is_request and message.method != "ACK":
                ctx.reply(build_response(message, 500, ROUTER_FAILED_REASON, via_source=envelope.remote))

    def _unparsable(self, record: MessageRecord, ctx: RouteContext, error: SipParseError) -> None:
        """Never drop a broken message silently: answer it, or close its connection; count either way.

        Responses are never answered (RFC 3261 section 18.1.2 discards them), so they are only counted.
        """
        if self._span is not None and self._tracing is not None:
            self._tracing.failed(self._span, "sip_parse_error", error.detail)
        answer = None
        if error.is_request:
            answer = response_for_unparsable(record.raw, error.status, f"{error.reason_phrase} ({error.detail})")
        if answer is not None:
            ctx.reply(answer)
            outcome = COUNT_UNPARSABLE_ANSWERED
        elif error.is_request:
            self._close_connection(record.conn_id)
            outcome = COUNT_UNPARSABLE_CLOSED
        else:
            outcome = COUNT_UNPARSABLE_RESPONSE
        self.count(outcome)
        self._ratelog.log(
            logging.INFO, outcome, "worker %d: %s from conn %d: %s",
            self.index, outcome, record.conn_id, _quoted(error.detail),
        )  # fmt: skip

    def _router_failed(self, error: Exception, where: str) -> None:
        """Count a router exception; log it at most once a second, its traceback only at debug level."""
        self.count(COUNT_ROUTER_ERRORS)
        self._ratelog.log(
            logging.ERROR, COUNT_ROUTER_ERRORS, "worker %d: router raised %s %s: %s",
            self.index, type(error).__qualname__, where, _quoted(str(error)),
        )  # fmt: skip
        log.debug("worker %d: router traceback", self.index, exc_info=error)

    def _run_callback(self, callback: OutcomeCallback, outcome: Outcome) -> None:
        try:
            callback(outcome)
        except Exception as error:
            self._router_failed(error, f"in the outcome callback of job {outcome.job_id}")

    def _ship_spans(self, tracing: RouteTracing) -> None:
        """This pass's spans go to the transport with the pass's other records; drops are counted there."""
        channel = self._channel_now()
        if channel is None:
            return  # they wait in the bounded queue for a channel
        for count, payload in tracing.batches(MAX_SPANS_BYTES):
            channel.out.append(encode_spans(count, self._pid, payload))
        dropped = tracing.recorder.dropped + tracing.oversize
        if dropped != self._spans_dropped:
            channel.counts[COUNT_SPANS_DROPPED] += dropped - self._spans_dropped
            self._spans_dropped = dropped

    def _flush(self) -> bool:
        """Send every channel's records; whether there were any."""
        if self._tracing is not None:
            self._ship_spans(self._tracing)
        if self._channels and (stages := self._stages.report(time.monotonic())) is not None:
            next(iter(self._channels.values())).out.append(encode_stages_record(stages))
        sent = False
        for channel in list(self._channels.values()):
            if channel.counts:
                channel.out.extend(encode_count(name, delta) for name, delta in channel.counts.items())
                channel.counts.clear()
            if channel.out:
                data = b"".join(channel.out)
                channel.out.clear()
                sent = True
                try:
                    channel.sock.sendall(data)
                except OSError:
                    self._close_channel(channel)
        return sent


def _quoted(text: str) -> str:
    """Peer text fit for a log line: escaped (no control characters, ASCII only) and cut."""
    cut = text[:MAX_LOGGED_PEER_CHARS]
    return ascii(cut) + ("..." if len(text) > MAX_LOGGED_PEER_CHARS else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sipwire.transport.worker", description=__doc__)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--settings", required=True, help="JSON of the transport's Settings")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings(**json.loads(args.settings))
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s worker-{args.index}[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    router = load_router(settings.router)
    if router.setup is not None:
        router.setup(settings)
    control = socket.socket(fileno=args.control_fd)
    tracing = worker_tracing()
    resolver = Resolver(ResolverLimits.from_settings(settings))
    try:
        Worker(
            args.index, control, router.route, resolver, tracing, router.connections_closed, settings.busy_poll_us
        ).run()
    finally:
        resolver.close()
        if tracing is not None:
            tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
