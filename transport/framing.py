"""Sans-IO SIP stream framer: bytes in, framing events out.

This is the *lightest parse that finds a message's boundaries* (RFC 3261
section 18.3): the header block ends at the first CRLFCRLF, and the body
length comes from ``Content-Length`` (or its compact form ``l``). Nothing
else of the message is looked at here; the full parse happens in a worker.

Between messages a stream may carry keep-alives (RFC 5626 section 4.4.1):
a CRLFCRLF "ping" must be answered with a single CRLF "pong", and a lone
CRLF is a pong (or stray padding) that is skipped.

The framer owns no socket, clock or logger. Feed it bytes with
:meth:`Framer.feed`; it returns the events the bytes completed, or raises
:class:`FramingError` naming the reason. After an error the stream is out
of sync and the connection must be closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from sipwire.errors import ProtocolError

#: Default size limits. 64 KiB for a whole message is the OpenSIPS/Kamailio
#: default and well above any real SIP message over TCP; 16 KiB of headers
#: is generous (typical requests carry well under 2 KiB) while keeping a
#: peer that never sends CRLFCRLF from buffering a whole message budget.
DEFAULT_MAX_MESSAGE_BYTES: Final = 65536
DEFAULT_MAX_HEADER_BYTES: Final = 16384

CRLF: Final = b"\r\n"
PING: Final = b"\r\n\r\n"
PONG: Final = b"\r\n"

# Content-Length at the start of any header line, long or compact form.
# Values may have surrounding whitespace (RFC 3261 section 7.3.1).
_CONTENT_LENGTH = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_DIGITS = re.compile(rb"[0-9]{1,9}")


class FramingErrorReason(StrEnum):
    """Why a stream could not be framed; the value is used as a counter label."""

    MISSING_CONTENT_LENGTH = "missing_content_length"
    BAD_CONTENT_LENGTH = "bad_content_length"
    DUPLICATE_CONTENT_LENGTH = "duplicate_content_length"
    HEADERS_TOO_LARGE = "headers_too_large"
    MESSAGE_TOO_LARGE = "message_too_large"
    MESSAGE_TIMEOUT = "message_timeout"


class FramingError(ProtocolError):
    """The byte stream broke SIP framing; the connection cannot continue.

    ``header_block`` carries the complete header block when one was read
    (so the caller can still answer the request), or the lines received so
    far when the header block itself was too large. ``events`` holds what
    the same :meth:`Framer.feed` call completed before the error: good
    messages pipelined ahead of the bad one, which must not be lost.
    """

    def __init__(self, reason: FramingErrorReason, detail: str, header_block: bytes = b"") -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.header_block = header_block
        self.events: list[Event] = []


class Ping:
    """A CRLFCRLF keep-alive between messages; answer it with :data:`PONG`."""

    __slots__ = ()


#: The one ping instance (pings carry no data).
PING_EVENT: Final = Ping()


@dataclass(frozen=True, slots=True)
class FramerLimits:
    """Size limits enforced while framing."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES


Event = bytes | Ping


class Framer:
    """Turns one connection's byte stream into whole messages and pings.

    Complete messages are returned as ``bytes`` (start line to the end of
    the body); keep-alive pings as :data:`PING_EVENT`.
    """

    __slots__ = ("_body_end", "_buffer", "_limits", "_scanned")

    def __init__(self, limits: FramerLimits | None = None) -> None:
        self._buffer = bytearray()
        self._limits = limits or FramerLimits()
        # End offset of the message in progress once its headers are known.
        self._body_end = -1
        # Bytes of the buffer already searched for CRLFCRLF without success,
        # so a header block arriving in many reads is not searched again.
        self._scanned = 0

    @property
    def in_message(self) -> bool:
        """True while part of a message (not just CRLF padding) is buffered."""
        buffer = self._buffer
        if not buffer:
            return False
        if buffer[0] != 13 and buffer[0] != 10:
            return True
        return bool(buffer.lstrip(CRLF))

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Event]:
        """Add bytes read from the stream; return the events they complete."""
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        while buffer:
            if self._body_end < 0:
                if buffer[0] == 13 or buffer[0] == 10:  # CR or LF: ping, pong or padding
                    if not self._consume_keepalive(events):
                        break
                    continue
                try:
                    if not self._read_headers():
                        break
                except FramingError as error:
                    error.events = events
                    raise
            end = self._body_end
            if len(buffer) < end:
                break
            events.append(bytes(buffer[:end]))
            del buffer[:end]
            self._body_end = -1
            self._scanned = 0
        return events

    def _consume_keepalive(self, events: list[Event]) -> bool:
        """Consume CRLF padding at a message boundary; False if more bytes are needed."""
        buffer = self._buffer
        if buffer.startswith(PING):
            del buffer[:4]
            events.append(PING_EVENT)
            return True
        if len(buffer) < len(PING) and PING.startswith(buffer):
            return False  # could still become a ping
        if buffer.startswith(CRLF):
            del buffer[:2]  # a pong or a stray CRLF before a message
            return True
        del buffer[:1]  # a bare CR or LF: padding, skip it
        return True

    def _read_headers(self) -> bool:
        """Find the header block and body length; False if more bytes are needed."""
        buffer = self._buffer
        limits = self._limits
        header_end = buffer.find(PING, max(0, self._scanned - 3))
        if header_end < 0:
            self._scanned = len(buffer)
            if len(buffer) > limits.max_header_bytes:
                last_line_end = buffer.rfind(CRLF)
                partial = bytes(buffer[: last_line_end + 2]) if last_line_end >= 0 else b""
                raise FramingError(
                    FramingErrorReason.HEADERS_TOO_LARGE,
                    f"no end of headers within {limits.max_header_bytes} bytes",
                    partial,
                )
            return False
        header_end += 4
        if header_end > limits.max_header_bytes:
            raise FramingError(
                FramingErrorReason.HEADERS_TOO_LARGE,
                f"header block of {header_end} bytes exceeds {limits.max_header_bytes}",
                bytes(buffer[:header_end]),
            )
        header_block = bytes(buffer[:header_end])
        body_length = content_length(header_block)
        total = header_end + body_length
        if total > limits.max_message_bytes:
            raise FramingError(
                FramingErrorReason.MESSAGE_TOO_LARGE,
                f"message of {total} bytes exceeds {limits.max_message_bytes}",
                header_block,
            )
        self._body_end = total
        return True


def content_length(header_block: bytes) -> int:
    """Return the body length a complete header block declares.

    Raises :class:`FramingError` when the header is missing (mandatory on
    streams, RFC 3261 section 18.3), repeated, negative or not a number.
    """
    values = _CONTENT_LENGTH.findall(header_block)
    if not values:
        raise FramingError(
            FramingErrorReason.MISSING_CONTENT_LENGTH,
            "no Content-Length header on a stream transport",
            header_block,
        )
    if len(values) > 1:
        raise FramingError(
            FramingErrorReason.DUPLICATE_CONTENT_LENGTH,
            f"{len(values)} Content-Length headers: {b', '.join(values)!r}",
            header_block,
        )
    value = values[0].strip()
    if _DIGITS.fullmatch(value) is None:
        raise FramingError(
            FramingErrorReason.BAD_CONTENT_LENGTH,
            f"Content-Length {value!r} is not a non-negative integer",
            header_block,
        )
    return int(value)
