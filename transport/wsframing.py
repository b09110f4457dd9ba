"""Sans-IO SIP over WebSocket (RFC 7118), server side, on wsproto: bytes in, framing events out.

What :mod:`transport.framing` is to a TCP or TLS stream, this is to a WS or WSS
connection, so the read path, dispatch, queues and limits stay one code path.
:meth:`WsFramer.feed` takes the bytes read and returns the same events as the
SIP framer: whole SIP messages (``bytes``; RFC 7118 puts exactly one in each
WebSocket message, text or binary, fragmented or not) and keep-alive pings
(a message of CRLFCRLF, as SIP.js sends, answered with a CRLF message). What
the WebSocket layer must send by itself (the 101 answer or an HTTP refusal of
the upgrade, a pong) travels in the same list as :class:`WsControl` events, in
order, so the read path needs no WebSocket branch. When the WebSocket ends
(the peer's close, or input that breaks the protocol or a limit)
:meth:`WsFramer.feed` raises :class:`WebSocketClosedError` carrying the last bytes
to send (the close frame or the refusal) and the counter to add.

The handshake must ask for the ``sip`` subprotocol (RFC 7118 section 4.1) and,
when an allow-list is set, come from an allowed ``Origin`` (RFC 6455 section
10.2: what stops another web site's page from using a visitor's browser as a
SIP client). No extension is offered back: permessage-deflate would cost each
connection two zlib streams, and SIP messages are small. wsproto does the
HTTP upgrade (through h11), the frame codec, masking, UTF-8 checks of text
and the close handshake; this module adds what SIP needs and the limits.

:meth:`WsFramer.frame` wraps an outgoing SIP message in one WebSocket message:
text when it is UTF-8 (as SIP messages are), binary otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.events import Ping as WsPing
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from sipwire.errors import ProtocolError
from sipwire.transport.framing import PING, PING_EVENT, Event, Ping

#: The WebSocket subprotocol of SIP (RFC 7118 section 4.1), required in the handshake.
SUBPROTOCOL: Final = "sip"

#: Close codes from here up (to 4999) are the libraries' and applications' (RFC 6455 section 7.4.2), not the RFC's.
APPLICATION_CLOSE_CODES: Final = 3000

#: What an HTTP refusal says when even h11 cannot produce one (a request line it could not parse).
_FALLBACK_REFUSAL: Final = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

#: wsproto's handshake complaints, by a fixed piece of their text, to counter labels (never peer text).
_HANDSHAKE_REASONS: Final = (
    ("Connection: Upgrade", "not_upgrade"),
    ("Upgrade: websocket", "not_upgrade"),
    ("method must be GET", "not_get"),
    ("Sec-WebSocket-Version", "bad_version"),
    ("Sec-WebSocket-Key", "no_key"),
    ("Host", "no_host"),
)


@dataclass(frozen=True, slots=True)
class WsLimits:
    """What a WebSocket peer may send: sizes in bytes, and the origins allowed (empty: any)."""

    max_message_bytes: int
    max_frame_bytes: int
    allowed_origins: frozenset[str] = frozenset()


class WsControl(Ping):
    """Bytes the WebSocket layer sends by itself, in order with the messages of the same read.

    A :class:`~transport.framing.Ping` because, like a keep-alive, the transport answers it on its own;
    ``counter`` is what to count, and ``upgraded`` marks the 101 that opens the WebSocket.
    """

    __slots__ = ("counter", "data", "upgraded")

    def __init__(self, data: bytes, counter: str, upgraded: bool = False) -> None:
        self.data = data
        self.counter = counter
        self.upgraded = upgraded


class WebSocketClosedError(ProtocolError):
    """The WebSocket is over: the peer closed it, or sent what the protocol or a limit forbids.

    ``events`` holds what the same feed completed before, then a :class:`WsControl` with the last
    bytes to send (a close frame or an HTTP refusal; none when nothing can be sent); ``counter``
    names the case (``ws_handshake_failed.<reason>``, ``ws_close.<code>``, ``ws_peer_close.<code>``);
    ``peer_closed`` is true for an orderly close by the peer, which is no error.
    """

    def __init__(self, counter: str, detail: str, events: list[Event], peer_closed: bool = False) -> None:
        super().__init__(detail)
        self.counter = counter
        self.events = events
        self.peer_closed = peer_closed


class WsFramer:
    """One server-side WebSocket carrying SIP; see the module docstring."""

    __slots__ = ("_frame_bytes", "_limits", "_parts", "_size", "_ws", "awaiting_pong", "open", "origin")

    def __init__(self, limits: WsLimits) -> None:
        # The handshake object (h11 inside) until the upgrade; then only the frame-level connection, so
        # an idle WebSocket does not keep an HTTP parser it will never use again (idle memory).
        self._ws: WSConnection | Connection = WSConnection(ConnectionType.SERVER)
        self._limits = limits
        self._parts: list[bytes] = []  # the fragments of a message in progress
        self._size = 0  # bytes in _parts
        self._frame_bytes = 0  # payload bytes of the data frame in progress
        self.open = False  # the 101 went out: messages flow
        self.awaiting_pong = False  # a ping of ours went out and nothing came back since (see :meth:`ping`)
        self.origin = ""  # the handshake's Origin, for logs

    @property
    def in_message(self) -> bool:
        """True while part of a message is buffered (a fragment, or a frame not yet whole)."""
        return bool(self._parts) or self._frame_bytes > 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a message not yet complete."""
        return self._size + self._frame_bytes

    def feed(self, data: bytes) -> list[Event]:
        """Add bytes read from the connection; return the events they complete (see the module docstring)."""
        ws = self._ws
        events: list[Event] = []
        self.awaiting_pong = False  # anything from the peer shows it is there, as a pong would
        try:
            ws.receive_data(data)
        except RemoteProtocolError as error:  # the upgrade request is not one: refuse it
            raise self._refuse(error.event_hint, _handshake_reason(str(error)), str(error), events) from None
        except LocalProtocolError:  # bytes after the close: nothing more to read
            raise WebSocketClosedError("ws_close.after_close", "data after the close", events) from None
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                message = self._message(event, events)
                if message is not None:
                    events.append(message)
            elif isinstance(event, WsPing):
                events.append(WsControl(ws.send(event.response()), "ws_pings"))
            elif isinstance(event, Pong):
                pass  # the answer to our ping: awaiting_pong is already cleared
            elif isinstance(event, CloseConnection):
                raise self._closed(event, events)
            elif isinstance(event, Request):
                events.append(self._upgrade(event, events))
        return events

    def frame(self, payload: bytes) -> bytes:
        """``payload`` as one WebSocket message; b"" once the WebSocket cannot carry it (not open, closing)."""
        if not self.open:
            return b""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            event: TextMessage | BytesMessage = BytesMessage(data=payload)
        else:
            event = TextMessage(data=text)
        try:
            return self._ws.send(event)
        except LocalProtocolError:
            return b""

    def ping(self) -> bytes:
        """A ping frame to see an idle peer is there; its pong (or any bytes) clears :attr:`awaiting_pong`."""
        if not self.open:
            return b""
        try:
            data = self._ws.send(WsPing(payload=b"sip"))
        except LocalProtocolError:
            return b""
        self.awaiting_pong = True
        return data

    def close(self, code: int, reason: str) -> bytes:
        """The close frame that starts our side of the close handshake; b"" when it cannot be sent."""
        if not self.open:
            return b""
        try:
            return self._ws.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:
            return b""

    # -- inside feed ------------------------------------------------------------------------------

    def _upgrade(self, request: Request, events: list[Event]) -> WsControl:
        """Accept the upgrade with the ``sip`` subprotocol, or refuse it (no sip, an origin not allowed)."""
        origin = next((value.decode("latin-1") for name, value in request.extra_headers if name == b"origin"), "")
        self.origin = origin
        allowed = self._limits.allowed_origins
        if allowed and origin and origin not in allowed:
            hint = RejectConnection(status_code=403)
            raise self._refuse(hint, "origin", f"Origin {origin[:80]!r} is not in ws_allowed_origins", events)
        if SUBPROTOCOL not in (protocol.lower() for protocol in request.subprotocols):
            hint = RejectConnection(status_code=400)
            raise self._refuse(hint, "no_sip_subprotocol", "the WebSocket subprotocol sip is required", events)
        handshake = self._ws
        data = handshake.send(AcceptConnection(subprotocol=SUBPROTOCOL))
        if isinstance(handshake, WSConnection) and handshake.connection is not None:
            self._ws = handshake.connection
        self.open = True
        return WsControl(data, "ws_handshakes", upgraded=True)

    def _refuse(self, hint: object, reason: str, detail: str, events: list[Event]) -> WebSocketClosedError:
        """The HTTP answer refusing the upgrade, with the reason as its body; then the connection closes."""
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        headers = list(hint.headers) if isinstance(hint, RejectConnection) else []
        body = f"{detail}\n".encode()
        headers += [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Content-Length", b"%d" % len(body)),
                    (b"Connection", b"close")]  # fmt: skip
        try:
            data = self._ws.send(RejectConnection(status_code=status, headers=headers, has_body=True))
            data += self._ws.send(RejectData(data=body, body_finished=True))
        except (LocalProtocolError, h11.LocalProtocolError):
            data = _FALLBACK_REFUSAL
        events.append(WsControl(data, ""))
        return WebSocketClosedError(f"ws_handshake_failed.{reason}", f"WebSocket upgrade refused ({status}): {detail}",
                               events)  # fmt: skip

    def _message(self, event: TextMessage | BytesMessage, events: list[Event]) -> Event | None:
        """One SIP message once its last fragment is in; None meanwhile, and for a CRLF pong."""
        data = event.data
        chunk = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        limits = self._limits
        frame_bytes = self._frame_bytes + len(chunk)
        if frame_bytes > limits.max_frame_bytes:
            detail = f"a frame exceeds ws_max_frame_bytes {limits.max_frame_bytes}"
            raise self._fail(CloseReason.MESSAGE_TOO_BIG, detail, events)
        self._frame_bytes = 0 if event.frame_finished else frame_bytes
        if not event.message_finished or self._parts:
            self._parts.append(chunk)
            self._size += len(chunk)
            if self._size > limits.max_message_bytes:
                raise self._fail(CloseReason.MESSAGE_TOO_BIG,
                                 f"a message exceeds max_message_bytes {limits.max_message_bytes}", events)  # fmt: skip
            if not event.message_finished:
                return None
            chunk = b"".join(self._parts)
            self._parts = []
            self._size = 0
        elif len(chunk) > limits.max_message_bytes:
            raise self._fail(CloseReason.MESSAGE_TOO_BIG,
                             f"a message exceeds max_message_bytes {limits.max_message_bytes}", events)  # fmt: skip
        if chunk == PING:
            return PING_EVENT
        if not chunk.strip(b"\r\n"):
            return None  # a CRLF pong, or padding
        return chunk

    def _fail(self, code: CloseReason, detail: str, events: list[Event]) -> WebSocketClosedError:
        """Start the close handshake with ``code`` because of what the peer sent."""
        data = self.close(code, detail[:100])
        if data:
            events.append(WsControl(data, ""))
        return WebSocketClosedError(f"ws_close.{int(code)}", detail, events)

    def _closed(self, event: CloseConnection, events: list[Event]) -> WebSocketClosedError:
        """A close frame from the peer (answered), or a frame wsproto refused (closed with its code)."""
        ws = self._ws  # the frame-level connection: a close frame comes only after the upgrade
        if ws.state is ConnectionState.REMOTE_CLOSING:
            events.append(WsControl(ws.send(event.response()), ""))
            detail = f"closed by the peer ({event.code})"
            return WebSocketClosedError(_peer_close_counter(event.code), detail, events, peer_closed=True)
        if ws.state is ConnectionState.CLOSED:  # the peer's answer to our close
            return WebSocketClosedError(_peer_close_counter(event.code), "close handshake done", events, True)
        return self._fail(CloseReason(event.code), f"bad frame: {event.reason}", events)


def _peer_close_counter(code: int) -> str:
    """The counter of a close by the peer: its code when RFC 6455 defines it, else one name for 3000-4999.

    Those are all valid (libraries' and applications' codes): one counter name each would let a peer fill the
    stats block's counter table with names of its choice, and every name after them would go uncounted.
    """
    return f"ws_peer_close.{int(code)}" if code < APPLICATION_CLOSE_CODES else "ws_peer_close.application"


def _handshake_reason(detail: str) -> str:
    """A fixed counter label for wsproto's complaint about an upgrade request."""
    for text, reason in _HANDSHAKE_REASONS:
        if text in detail:
            return reason
    return "bad_http"
