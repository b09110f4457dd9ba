"""An I/O thread's readiness poller: ``select.epoll`` behind the part of ``selectors`` the layers use.

``selectors.EpollSelector`` keeps a ``SelectorKey`` per file object and builds a tuple per
ready event in Python; with a new connection per exchange its register, unregister and
select took 14 % of an I/O thread (py-spy, tcp/tn at 6,000/s; docs/BENCHMARKS.md). Here a
registration is one dict entry per descriptor, a ready event is the registered data with
its mask, and a socket about to be closed is only forgotten (:meth:`Poller.forget`):
closing its last descriptor takes it out of the epoll set, so no ``epoll_ctl`` is spent.

Masks keep ``selectors``' values (:data:`READ`, :data:`WRITE`, which the layers and a TLS
stream's ``wants`` use too); an error or hang-up is reported as both, limited to what was
registered, as ``selectors`` does.
"""

from __future__ import annotations

import contextlib
import select
import selectors
from typing import Any, Final, Protocol

READ: Final = selectors.EVENT_READ
WRITE: Final = selectors.EVENT_WRITE
#: epoll's flags for each combination of READ (1) and WRITE (2).
_TO_EPOLL: Final = (0, select.EPOLLIN, select.EPOLLOUT, select.EPOLLIN | select.EPOLLOUT)
_NOT_IN: Final = ~select.EPOLLIN  # any other flag (out, error, hang-up) makes a descriptor writable
_NOT_OUT: Final = ~select.EPOLLOUT  # any other flag (in, error, hang-up) makes it readable


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def _fd(file: int | HasFileno) -> int:
    return file if isinstance(file, int) else file.fileno()


class Poller:
    """Descriptors registered with a mask and data; :meth:`select` returns ``(data, mask)`` pairs."""

    __slots__ = ("_epoll", "_registered")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._registered: dict[int, tuple[int, Any]] = {}  # descriptor -> (mask, data)

    def register(self, file: int | HasFileno, events: int, data: Any) -> None:
        fd = _fd(file)
        self._epoll.register(fd, _TO_EPOLL[events])
        self._registered[fd] = (events, data)

    def modify(self, file: int | HasFileno, events: int, data: Any) -> None:
        fd = _fd(file)
        self._epoll.modify(fd, _TO_EPOLL[events])
        self._registered[fd] = (events, data)

    def unregister(self, file: int | HasFileno) -> None:
        """Stop watching an open descriptor; KeyError if it is not registered."""
        fd = _fd(file)
        del self._registered[fd]
        self._epoll.unregister(fd)

    def forget(self, file: int | HasFileno) -> None:
        """Drop a descriptor its caller closes next (and never shares): the close takes it out of the set."""
        self._registered.pop(_fd(file), None)

    def select(self, timeout: float | None) -> list[tuple[Any, int]]:
        """Wait up to ``timeout`` seconds (None: until something is ready); the ready ``(data, mask)``."""
        registered = self._registered
        ready = []
        for fd, flags in self._epoll.poll(-1 if timeout is None else timeout):
            entry = registered.get(fd)
            if entry is None:  # forgotten but still open (its close failed): stop hearing of it, not spin
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
                continue
            events, data = entry
            mask = (WRITE if flags & _NOT_IN else 0) | (READ if flags & _NOT_OUT else 0)
            ready.append((data, mask & events))
        return ready

    def close(self) -> None:
        self._epoll.close()
