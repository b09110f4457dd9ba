"""Name resolution that never blocks a worker's loop.

A router may send to a host *name* (a Via, a Contact, a configured
upstream), and names can come from peers. ``getaddrinfo`` blocks for as
long as the DNS takes, so it runs on a few resolver threads; the worker's
loop only looks at caches and collects finished lookups:

* :meth:`Resolver.cached` answers from the positive cache (an address) or
  the negative cache (why the name failed), else ``None``;
* :meth:`Resolver.lookup` starts a lookup (or joins one already running for
  the same name) and calls back on the loop's thread, from :meth:`collect`,
  once it finished or timed out. The resolver threads only append the
  result to a queue and write an eventfd the loop's selector watches.

Every bound is a setting: lookups running at once, how long a waiter waits,
how long answers and failures are remembered, how many names are cached.
``getaddrinfo`` cannot be cancelled, so a lookup that outlives its timeout
fails its waiters at once and, if it finishes later, only fills the cache.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from sipwire.config import Settings

#: Names longer than this are refused without a lookup (RFC 1035: 253 characters in text form).
MAX_NAME_CHARS: Final = 253


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a name has no address: the text names the host and the cause."""

    reason: str


#: Called on the loop's thread with an IP literal, or why there is none.
Waiter = Callable[[str | Failure], None]


@dataclass(frozen=True, slots=True)
class ResolverLimits:
    """The ``dns_*`` settings (descriptions in :class:`sipwire.config.Settings`)."""

    threads: int
    timeout: float
    positive_seconds: float
    negative_seconds: float
    cache_entries: int
    max_pending: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ResolverLimits:
        return cls(
            threads=settings.dns_threads,
            timeout=settings.dns_timeout,
            positive_seconds=settings.dns_cache_seconds,
            negative_seconds=settings.dns_negative_cache_seconds,
            cache_entries=settings.dns_cache_entries,
            max_pending=settings.dns_max_pending,
        )


class _Pending:
    __slots__ = ("deadline", "waiters")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.waiters: list[Waiter] = []


def first_address(host: str, port: int) -> str | Failure:
    """On a resolver thread: the first stream address of ``host`` (blocking ``getaddrinfo``), or why none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        return Failure(f"cannot resolve {host!r}: {error}")
    if not infos:
        return Failure(f"{host!r} has no address")
    return str(infos[0][4][0])


class Resolver:
    """Resolves ``(host, port)`` to one IP literal off the caller's loop; see the module docstring.

    ``resolve`` is the blocking lookup run on the resolver threads (:func:`first_address`).
    """

    def __init__(self, limits: ResolverLimits, resolve: Callable[[str, int], str | Failure] = first_address) -> None:
        self.limits = limits
        self._resolve = resolve
        self._pool = ThreadPoolExecutor(max_workers=limits.threads, thread_name_prefix="sipwire-dns")
        self._cache: OrderedDict[tuple[str, int], tuple[str | Failure, float]] = OrderedDict()
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._finished: deque[tuple[tuple[str, int], str | Failure]] = deque()
        #: Readable when lookups finished: register it in the loop's selector and call :meth:`collect`.
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.lookups = 0
        self.failures = 0
        self.timeouts = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        os.close(self.wake_fd)

    def cached(self, host: str, port: int) -> str | Failure | None:
        key = (host.lower(), port)
        entry = self._cache.get(key)
        if entry is None:
            return None
        answer, expires = entry
        if expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return answer

    def lookup(self, host: str, port: int, waiter: Waiter) -> None:
        """Call ``waiter`` from :meth:`collect` with an address or a :class:`Failure`; never blocks."""
        key = (host.lower(), port)
        pending = self._pending.get(key)
        if pending is not None:
            pending.waiters.append(waiter)
            return
        if len(host) > MAX_NAME_CHARS:
            waiter(Failure(f"host name of {len(host)} characters is longer than {MAX_NAME_CHARS}"))
            return
        if len(self._pending) >= self.limits.max_pending:
            waiter(Failure(f"{len(self._pending)} lookups already running (dns_max_pending); {host!r} not tried"))
            return
        pending = _Pending(time.monotonic() + self.limits.timeout)
        pending.waiters.append(waiter)
        self._pending[key] = pending
        self.lookups += 1
        future = self._pool.submit(self._resolve, host, port)
        future.add_done_callback(lambda done: self._finish(key, done))

    def _finish(self, key: tuple[str, int], done: Future[str | Failure]) -> None:
        """On a resolver thread: hand the answer to the loop (a deque append is atomic)."""
        if done.cancelled():
            return
        self._finished.append((key, done.result()))
        with contextlib.suppress(OSError):  # closed while stopping
            os.eventfd_write(self.wake_fd, 1)

    def collect(self) -> None:
        """On the loop's thread: cache finished lookups, answer their waiters, fail timed-out ones."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wake_fd)
        now = time.monotonic()
        while self._finished:
            key, answer = self._finished.popleft()
            self._remember(key, answer, now)
            pending = self._pending.pop(key, None)
            if pending is not None:
                for waiter in pending.waiters:
                    waiter(answer)
        for key, pending in list(self._pending.items()):
            if pending.deadline <= now and pending.waiters:
                self.timeouts += 1
                failure = Failure(f"resolving {key[0]!r} took longer than {self.limits.timeout}s")
                waiters, pending.waiters = pending.waiters, []
                for waiter in waiters:
                    waiter(failure)
                # The entry stays until the thread returns, so a name that hangs is not asked again meanwhile.

    @property
    def waiting(self) -> bool:
        """Lookups are under way: :meth:`collect` has answers or timeouts to look for on every pass."""
        return bool(self._pending)

    def seconds_to_next_deadline(self) -> float | None:
        """How long the loop may sleep before :meth:`collect` must fail a lookup that timed out."""
        deadlines = [p.deadline for p in self._pending.values() if p.waiters]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _remember(self, key: tuple[str, int], answer: str | Failure, now: float) -> None:
        if isinstance(answer, Failure):
            self.failures += 1
            seconds = self.limits.negative_seconds
        else:
            seconds = self.limits.positive_seconds
        self._cache[key] = (answer, now + seconds)
        self._cache.move_to_end(key)
        while len(self._cache) > self.limits.cache_entries:
            self._cache.popitem(last=False)
