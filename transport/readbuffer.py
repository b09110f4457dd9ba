"""One reusable receive buffer per reader (kept free of OpenSSL so workers can use it)."""

from __future__ import annotations

import socket


class ReadBuffer:
    """A receive buffer reused for every read of one thread or process.

    ``sock.recv(n)`` allocates an ``n``-byte object per call; above glibc's
    mmap threshold (128 KiB) that is an mmap, an mremap and a munmap per
    read, which strace showed as the largest syscall cost after epoll.
    Reading into one buffer and copying out only what arrived avoids it.
    """

    __slots__ = ("buffer", "view")

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)

    def recv(self, sock: socket.socket) -> bytes:
        """One ``recv`` into the buffer; raises what ``sock.recv`` raises."""
        count = sock.recv_into(self.buffer)
        return self.view[:count].tobytes()
