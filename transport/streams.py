"""Byte streams under a connection: plain TCP, or TLS through pyOpenSSL.

The I/O thread reads and writes every connection through one of these, so
framing, dispatch, write queues, limits and resize are one code path for
both transports. Errors from the socket layer (``OSError``) and from
OpenSSL (``SSL.Error``) are translated here, once, into
:class:`StreamError` carrying the write-job result they mean.

Theory of operation for TLS on a non-blocking socket (OpenSSL's rules):

* ``do_handshake``, ``recv`` and ``send`` may each need the *other*
  direction: a read can need to write (TLS 1.3 key update, a handshake
  message) and a write can need to read. ``WantReadError`` means "call
  again when the socket is readable", ``WantWriteError`` "when writable".
  :meth:`TlsStream.handshake` returns which one; after ``recv``/``send``,
  :attr:`TlsStream.wants` says which extra event the owner must watch.
* OpenSSL hands out at most one record (16 KiB) per ``recv``; decrypted
  bytes left in a record are reported by ``pending()`` and would never
  wake the selector, so :meth:`TlsStream.recv` drains until OpenSSL wants
  more from the socket.
* A ``send`` that returned ``WantWriteError`` must be retried with the
  same leading bytes; the owner keeps the unsent tail at the front of its
  queue, and the contexts allow a moved buffer and partial writes.
* A peer closing without ``close_notify`` (``SysCallError(-1)``) is an
  ordinary end of stream for SIP: the framer decides if a message was cut.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from typing import Final

from OpenSSL import SSL

from sipwire.errors import ConnectionIOError
from sipwire.transport.outcome import WriteResult
from sipwire.transport.poller import READ, WRITE
from sipwire.transport.readbuffer import ReadBuffer
from sipwire.transport.routing import is_ip_literal
from sipwire.transport.tls import describe_ssl_error

#: Records read per :meth:`TlsStream.recv` at most, to bound one connection's turn.
TLS_RECORDS_PER_READ: Final = 16


ERRNO_RESULTS: Final = {
    errno.ECONNREFUSED: WriteResult.REFUSED,
    errno.ETIMEDOUT: WriteResult.TIMEOUT,
    errno.ECONNRESET: WriteResult.RESET,
    errno.EPIPE: WriteResult.RESET,
    errno.ENETUNREACH: WriteResult.UNREACHABLE,
    errno.EHOSTUNREACH: WriteResult.UNREACHABLE,
    errno.EADDRNOTAVAIL: WriteResult.UNREACHABLE,
}


class StreamError(ConnectionIOError):
    """The stream cannot continue; ``result`` is what pending write jobs are told."""

    def __init__(self, reason: str, result: WriteResult) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result = result


def _os_error(action: str, error: OSError) -> StreamError:
    result = ERRNO_RESULTS.get(error.errno or 0, WriteResult.RESET)
    return StreamError(f"{action} failed: {error.strerror or error}", result)


class TcpStream:
    """A plain non-blocking TCP socket."""

    __slots__ = ("sock",)

    wants = 0  # plain TCP never needs the other direction

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, reader: ReadBuffer) -> bytes | None:
        """Bytes read, ``b""`` at end of stream, None when nothing is available."""
        try:
            return reader.recv(self.sock)
        except BlockingIOError:
            return None
        except OSError as error:
            raise _os_error("read", error) from error

    def send(self, data: bytes | memoryview) -> int:
        """Bytes the kernel took (0 when its buffer is full)."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as error:
            raise _os_error("write", error) from error

    def close(self) -> None:
        self.sock.close()


class TlsStream:
    """A pyOpenSSL connection over a non-blocking socket; see the module docstring."""

    __slots__ = ("handshake_started", "server_name", "sock", "ssl", "verify_peer", "wants")

    def __init__(self, sock: socket.socket, context: SSL.Context, *, server_side: bool, server_name: str = "") -> None:
        self.sock = sock
        self.ssl = SSL.Connection(context, sock)
        self.server_name = server_name  # what an outbound peer's certificate must name
        self.verify_peer = not server_side
        if server_side:
            self.ssl.set_accept_state()
        else:
            self.ssl.set_connect_state()
            if server_name and not is_ip_literal(server_name):  # SNI carries names only (RFC 6066)
                self.ssl.set_tlsext_host_name(server_name.encode("idna"))
        # During the handshake: the event it waits for. Once open: the event a
        # recv/send needs besides its own (a read that must write, or vice versa).
        self.wants = READ if server_side else 0
        self.handshake_started = time.monotonic()

    def skip_verification(self) -> None:
        """Accept any certificate (operator opt-out for a lab destination)."""
        self.verify_peer = False
        self.ssl.set_verify(SSL.VERIFY_NONE, None)

    def handshake(self) -> int:
        """Advance the handshake: 0 when done, else the selector event it waits for."""
        try:
            self.ssl.do_handshake()
        except SSL.WantReadError:
            self.wants = READ
            return READ
        except SSL.WantWriteError:
            self.wants = WRITE
            return WRITE
        except SSL.Error as error:
            raise StreamError(describe_ssl_error(error), WriteResult.TLS_FAILED) from error
        except OSError as error:
            raise _os_error("TLS handshake", error) from error
        self.wants = 0
        return 0

    def recv(self, reader: ReadBuffer) -> bytes | None:
        """Decrypted bytes (several records at most), ``b""`` at end of stream, None if none yet."""
        view = reader.view
        size = len(view)
        total = 0
        self.wants &= ~WRITE
        for _ in range(TLS_RECORDS_PER_READ):
            if total == size:
                break
            try:
                count = self.ssl.recv_into(view[total:], size - total)
            except SSL.WantReadError:
                break
            except SSL.WantWriteError:
                self.wants |= WRITE
                break
            except SSL.ZeroReturnError:
                return view[:total].tobytes()  # close_notify: end of stream (after what came before)
            except SSL.SysCallError as error:
                if error.args and error.args[0] == -1:
                    return view[:total].tobytes()  # EOF without close_notify
                raise StreamError(f"TLS read failed: {describe_ssl_error(error)}", WriteResult.RESET) from error
            except SSL.Error as error:
                raise StreamError(f"TLS read failed: {describe_ssl_error(error)}", WriteResult.RESET) from error
            except OSError as error:
                raise _os_error("read", error) from error
            if not count:
                break
            total += count
        return view[:total].tobytes() if total else None

    def send(self, data: bytes | memoryview) -> int:
        total = 0
        self.wants &= ~READ
        view = memoryview(data)
        while total < len(data):
            try:
                sent = self.ssl.send(view[total:])
            except SSL.WantWriteError:
                break
            except SSL.WantReadError:
                self.wants |= READ
                break
            except SSL.Error as error:
                raise StreamError(f"TLS write failed: {describe_ssl_error(error)}", WriteResult.RESET) from error
            except OSError as error:
                raise _os_error("write", error) from error
            total += sent
        return total

    def close(self) -> None:
        """Send close_notify if the socket takes it at once, then close (whatever the shutdown raised); never blocks."""
        try:
            with contextlib.suppress(SSL.Error, OSError):
                self.ssl.shutdown()
        finally:
            self.sock.close()  # the I/O thread's poller has forgotten it: only its close takes it out of epoll


Stream = TcpStream | TlsStream
