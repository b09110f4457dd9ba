"""WebSocket peers for the WS/WSS tests: the ``websockets`` library's client, and raw sockets for abuse.

``websockets`` (not wsproto, which the transport uses) is the independent,
well-behaved client; :class:`RawWs` writes bytes by hand for what no
well-behaved client sends, over plain TCP or TLS.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from typing import Any

from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from tests.conftest import RunningTransport, SipResponse

LOOPBACK = "127.0.0.1"


def tls_context() -> ssl.SSLContext:
    """A client context that trusts the transport's self-signed development certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def ws_url(running: RunningTransport, secure: bool) -> str:
    return f"wss://{LOOPBACK}:{running.wss_port}/" if secure else f"ws://{LOOPBACK}:{running.ws_port}/"


def threaded_client_tls_context() -> ssl.SSLContext:
    """:func:`tls_context` at most TLS 1.2, for the ``websockets`` sync client.

    That client reads its socket in a thread of its own while the caller's thread writes, two threads
    on one OpenSSL connection, which OpenSSL does not support. Under TLS 1.3 the server's session
    tickets arrive just after the handshake; when the reader processes them while the caller writes
    the upgrade request, the request is sometimes never sent (1 to 5 WSS connects in 100 here, and as
    often against a Python ``ssl`` server; none when that server sends no tickets). TLS 1.2 sends its
    tickets inside the handshake, so the two threads never meet in OpenSSL. TLS 1.3 WebSockets stay
    covered by :class:`RawWs` (one thread) and the browser tests.
    """
    context = tls_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def ws_connect(running: RunningTransport, secure: bool, origin: str | None = None, **options: Any) -> ClientConnection:
    """A ``websockets`` client asking for the ``sip`` subprotocol (no compression, no pings of its own)."""
    return connect(
        ws_url(running, secure),
        ssl=threaded_client_tls_context() if secure else None,
        subprotocols=[Subprotocol("sip")],
        origin=Origin(origin) if origin else None,
        compression=None,
        proxy=None,
        open_timeout=5,
        ping_interval=None,
        **options,
    )


def parse_response(raw: bytes | str) -> SipResponse:
    """One SIP response, as a WebSocket message carries it."""
    data = raw.encode() if isinstance(raw, str) else raw
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    version, status, reason = lines[0].split(" ", 2)
    assert version == "SIP/2.0", f"not a SIP response: {lines[0]!r}"
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return SipResponse(int(status), reason, headers, body, data)


def sip_over_ws(request: bytes, transport: str = "WS") -> bytes:
    """A test request (tests.conftest.sip_request) with a WebSocket Via, as RFC 7118 clients send it."""
    via = f"Via: SIP/2.0/{transport} df7jal23ls0d.invalid".encode()
    return request.replace(b"Via: SIP/2.0/TCP 127.0.0.1:5999", via)


class RawWs:
    """A WebSocket client written by hand over a real socket (TLS for WSS), for abuse tests."""

    def __init__(self, running: RunningTransport, secure: bool) -> None:
        port = running.wss_port if secure else running.ws_port
        sock = socket.create_connection((LOOPBACK, port), timeout=5.0)
        self.sock: socket.socket = tls_context().wrap_socket(sock) if secure else sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def upgrade(self, subprotocol: str = "sip", origin: str = "") -> bytes:
        """Send an upgrade request; the HTTP answer's head."""
        lines = [
            "GET / HTTP/1.1",
            f"Host: {LOOPBACK}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        if origin:
            lines.append(f"Origin: {origin}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        return self.read_head()

    def read_head(self, timeout: float = 5.0) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            self._fill(timeout)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def frame(self, opcode: int, payload: bytes, fin: bool = True, masked: bool = True) -> bytes:
        key = os.urandom(4) if masked else b""
        first = (0x80 if fin else 0) | opcode
        mask_bit = 0x80 if masked else 0
        if len(payload) < 126:
            header = bytes([first, mask_bit | len(payload)])
        elif len(payload) < 65536:
            header = bytes([first, mask_bit | 126]) + len(payload).to_bytes(2, "big")
        else:
            header = bytes([first, mask_bit | 127]) + len(payload).to_bytes(8, "big")
        body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if masked else payload
        return header + key + body

    def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame from the server (unmasked): opcode and payload."""
        while len(self.buffer) < 2:
            self._fill(timeout)
        length = self.buffer[1] & 0x7F
        start = 2
        if length == 126:
            while len(self.buffer) < 4:
                self._fill(timeout)
            length, start = int.from_bytes(self.buffer[2:4], "big"), 4
        while len(self.buffer) < start + length:
            self._fill(timeout)
        opcode, payload = self.buffer[0] & 0x0F, self.buffer[start : start + length]
        self.buffer = self.buffer[start + length :]
        return opcode, payload

    def read_close_code(self, timeout: float = 5.0) -> int:
        """Skip frames up to the server's close frame; its status code."""
        while True:
            opcode, payload = self.read_frame(timeout)
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")

    def wait_closed(self, timeout: float = 5.0) -> float:
        """Read until the server closes the connection; when that happened (monotonic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionResetError, ssl.SSLError):
                return time.monotonic()
            if not data:
                return time.monotonic()
            self.buffer += data
        raise AssertionError(f"connection still open after {timeout}s")

    def _fill(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError(f"closed by the transport; buffered {self.buffer[:200]!r}")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawWs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
