"""The worker's side of write jobs, and the other records a router's context sends to the transport.

A layer of :class:`~sipwire.transport.worker.Worker` (its state is declared
here and set by the worker): the :class:`~sipwire.transport.routing.Sender`
that every :class:`~sipwire.transport.routing.RouteContext` calls. A job gets
an id and the WRITE flags that say which outcomes someone waits for (none
without a callback, a late ``sent`` for a callback on failures only, every
outcome at once otherwise); its callback waits in ``_callbacks`` for the
OUTCOME record. A job to a destination whose host is a name waits for the
worker's resolver first. COUNT, AUTH_FAILED and CLOSE records go out with
the same batch, on the channel of the message being routed.
"""

from __future__ import annotations

import socket
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, NamedTuple

from sipwire.transport.outcome import WriteResult
from sipwire.transport.resolver import Failure, Resolver
from sipwire.transport.routing import Destination, Outcome, OutcomeCallback, is_ip_literal
from sipwire.transport.sipsyntax import MAX_PORT
from sipwire.transport.wire import (
    FLAG_NO_OUTCOME,
    FLAG_PROMPT_OUTCOME,
    MAX_WRITE_PAYLOAD,
    RecordReader,
    encode_auth_failed,
    encode_close,
    encode_write,
)

if TYPE_CHECKING:
    from sipwire.otel.worker import RouteSpan, RouteTracing

COUNT_UNRESOLVABLE: Final = "write.unresolvable"  # a write job whose host name did not resolve


class WorkerChannel:
    """The worker's end of one I/O thread's channel: its socket, reader, and records waiting to go."""

    __slots__ = ("counts", "out", "reader", "sock", "thread_index")

    def __init__(self, thread_index: int, sock: socket.socket) -> None:
        self.thread_index = thread_index
        self.sock = sock
        self.reader = RecordReader()
        self.out: list[bytes] = []
        # Counter deltas since the last flush: one COUNT record per name per loop pass.
        self.counts: defaultdict[str, int] = defaultdict(int)


class WriteJobs:
    """Write jobs and the context's other records; see the module docstring."""

    _channels: dict[int, WorkerChannel]
    _current: WorkerChannel | None  # the channel of the message being routed
    _next_job: int
    _callbacks: dict[int, OutcomeCallback]
    _callback_contexts: dict[int, str]  # traced jobs' contexts, for the writes of their callbacks
    _deferred: list[Callable[[], None]]
    _resolver: Resolver
    _tracing: RouteTracing | None
    _span: RouteSpan | None
    _trace_context: str
    _run_callback: Callable[[OutcomeCallback, Outcome], None]  # the worker's: a failing callback is counted

    def submit(
        self,
        conn_id: int,
        destination: Destination | None,
        data: bytes,
        on_outcome: OutcomeCallback | None,
        failures_only: bool = False,
    ) -> int:
        job_id = self._next_job
        self._next_job += 1
        if len(data) > MAX_WRITE_PAYLOAD:
            reason = f"{len(data)} bytes exceed the {MAX_WRITE_PAYLOAD}-byte limit of one write job"
            self._fail_later(job_id, conn_id, on_outcome, WriteResult.TOO_LARGE, reason)
            return job_id
        channel = self._channel_now()
        if channel is None:
            self._fail_later(job_id, conn_id, on_outcome, WriteResult.SHUTDOWN, "no channel to the transport")
            return job_id
        flags = FLAG_PROMPT_OUTCOME
        if on_outcome is None:
            flags = FLAG_NO_OUTCOME
        elif failures_only:
            flags = 0  # its "sent" comes late, with later records: no wake-up for it
        trace_context = self._trace_context
        if self._span is not None and self._tracing is not None:
            self._tracing.replied(self._span, data)
        if destination is None:
            self._register_callback(job_id, on_outcome, trace_context)
            channel.out.append(
                encode_write(job_id, conn_id, "tcp", "", 0, data, flags=flags, trace_context=trace_context)
            )
            return job_id
        if not 0 <= destination.port <= MAX_PORT:  # a WRITE record's port is 16 bits; the transport refuses 0
            reason = f"port {destination.port} is out of range"
            self._fail_later(job_id, 0, on_outcome, WriteResult.BAD_DESTINATION, reason)
            return job_id
        job = DestinationJob(job_id, channel, destination, data, flags, trace_context, on_outcome)
        host = destination.host.strip("[]")
        if is_ip_literal(host):
            self._send_resolved(job, host)
            return job_id
        answer = self._resolver.cached(host, destination.port)
        if answer is None:  # resolved off the loop; the job leaves when the answer is collected
            self._resolver.lookup(host, destination.port, lambda found: self._send_resolved(job, found))
        else:
            self._send_resolved(job, answer)
        return job_id

    def _register_callback(self, job_id: int, on_outcome: OutcomeCallback | None, trace_context: str) -> None:
        if on_outcome is not None:
            self._callbacks[job_id] = on_outcome
            if trace_context:
                self._callback_contexts[job_id] = trace_context

    def _send_resolved(self, job: DestinationJob, address: str | Failure) -> None:
        """Encode a destination job once its host is an address (or fail it with ``unresolvable``)."""
        if isinstance(address, Failure):
            self.count(COUNT_UNRESOLVABLE)
            self._fail_later(job.job_id, 0, job.on_outcome, WriteResult.UNRESOLVABLE, address.reason)
            return
        destination = job.destination
        try:
            server_name = destination.tls_name(address)
        except ValueError as error:
            self._fail_later(job.job_id, 0, job.on_outcome, WriteResult.BAD_DESTINATION, str(error))
            return
        channel = job.channel
        if self._channels.get(channel.thread_index) is not channel:  # that I/O thread retired meanwhile
            replacement = next(iter(self._channels.values()), None)
            if replacement is None:
                reason = "no channel to the transport"
                self._fail_later(job.job_id, 0, job.on_outcome, WriteResult.SHUTDOWN, reason)
                return
            channel = replacement
        self._register_callback(job.job_id, job.on_outcome, job.trace_context)
        channel.out.append(
            encode_write(
                job.job_id, 0, destination.transport, address, destination.port, job.data, server_name, job.flags,
                job.trace_context,
            )
        )  # fmt: skip

    def _fail_later(
        self, job_id: int, conn_id: int, on_outcome: OutcomeCallback | None, result: WriteResult, reason: str
    ) -> None:
        if on_outcome is not None:
            outcome = Outcome(job_id, conn_id, result, reason)
            self._deferred.append(lambda: self._run_callback(on_outcome, outcome))

    def count(self, name: str) -> None:
        """Add one to a transport counter; ``name`` must be one of this module's ``COUNT_*``."""
        channel = self._channel_now()
        if channel is not None:  # else the transport is gone: nobody to count for
            channel.counts[name] += 1

    def auth_failed(self, conn_id: int) -> None:
        """Tell the transport that the peer of ``conn_id`` failed an authentication (its address is charged)."""
        channel = self._channel_now()
        if channel is not None:
            channel.out.append(encode_auth_failed(conn_id))

    def _close_connection(self, conn_id: int) -> None:
        """Ask the transport to close ``conn_id`` once what is queued for it is out."""
        channel = self._channel_now()
        if channel is not None:
            channel.out.append(encode_close(conn_id))

    def _channel_now(self) -> WorkerChannel | None:
        """The channel this worker's records go to now: the current message's, else any."""
        return self._current or next(iter(self._channels.values()), None)


class DestinationJob(NamedTuple):
    """A write job to a destination, kept while its host name resolves."""

    job_id: int
    channel: WorkerChannel
    destination: Destination
    data: bytes
    flags: int
    trace_context: str
    on_outcome: OutcomeCallback | None
