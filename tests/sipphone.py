"""A scripted SIP phone over one real TCP connection, with digest answers computed independently.

``Phone`` speaks raw SIP to a running transport: it builds requests,
answers a 401/407 challenge with credentials computed here with
``hashlib`` (RFC 7616 section 3.4.1, not with the code under test), and
reads whole messages with the transport's own sans-IO framer.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence

from sipwire.transport.framing import Framer
from sipwire.transport.sip import SipMessage, parse
from tests.conftest import RunningTransport

_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
_PARAM = re.compile(r'(\w[\w-]*)=(?:"([^"]*)"|([^,\s]+))')
_counter = itertools.count(1)


def challenge_params(value: str) -> dict[str, str]:
    """The parameters of a ``Digest ...`` challenge."""
    assert value.startswith("Digest "), value
    return {name.lower(): quoted or plain for name, quoted, plain in _PARAM.findall(value)}


def digest_credentials(
    challenge: str, method: str, uri: str, user: str, password: str, *, nc: int = 1, cnonce: str = "0a4f113b"
) -> str:
    """The Authorization value answering ``challenge`` (qop=auth)."""
    params = challenge_params(challenge)
    algorithm = params.get("algorithm", "MD5")
    digest = _HASHES[algorithm]
    realm, nonce = params["realm"], params["nonce"]
    ha1 = digest(f"{user}:{realm}:{password}".encode()).hexdigest()
    ha2 = digest(f"{method}:{uri}".encode()).hexdigest()
    count = f"{nc:08x}"
    response = digest(f"{ha1}:{nonce}:{count}:{cnonce}:auth:{ha2}".encode()).hexdigest()
    return (
        f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", response="{response}", '
        f'algorithm={algorithm}, qop=auth, nc={count}, cnonce="{cnonce}"'
    )


class Phone:
    """One SIP user agent on one connection to the transport."""

    def __init__(self, proxy: RunningTransport, aor: str, password: str = "", *, contact_host: str = "127.0.0.9"):
        self.sock = proxy.connect()
        self.framer = Framer()
        self.pending: list[SipMessage] = []
        self.aor = aor
        self.user, self.domain = aor.split("@")
        self.password = password
        self.port = self.sock.getsockname()[1]
        # The Contact names an address nobody listens on: only the connection reaches this phone.
        self.contact = f"sip:{self.user}@{contact_host}:{self.port};transport=tcp"
        self.call_id = f"reg-{self.user}-{next(_counter)}"
        self.cseq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Phone:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: float = 5.0) -> SipMessage:
        if self.pending:
            return self.pending.pop(0)
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"{self.aor}: connection closed by the transport")
            messages = [parse(event) for event in self.framer.feed(data) if isinstance(event, bytes)]
            if messages:
                self.pending.extend(messages[1:])
                return messages[0]

    def nothing(self, timeout: float = 0.7) -> None:
        """Assert that nothing arrives for ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        raise AssertionError(f"{self.aor}: unexpected {data[:200]!r}")

    def request(
        self,
        method: str,
        uri: str,
        *,
        to: str | None = None,
        call_id: str | None = None,
        cseq: int | None = None,
        headers: Sequence[tuple[str, str]] = (),
        branch: str | None = None,
        from_tag: str = "ft1",
        body: bytes = b"",
    ) -> bytes:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/TCP 127.0.0.9:{self.port};branch={branch or f'z9hG4bK-{self.user}-{next(_counter)}'};rport",
            "Max-Forwards: 70",
            f"From: <sip:{self.aor}>;tag={from_tag}",
            f"To: {to or f'<sip:{self.aor}>'}",
            f"Call-ID: {call_id or self.call_id}",
            f"CSeq: {cseq} {method}",
            *(f"{name}: {value}" for name, value in headers),
            f"Content-Length: {len(body)}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def register(
        self,
        contact: str | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        password: str | None = None,
        algorithm: str = "SHA-256",
    ) -> SipMessage:
        """REGISTER ``contact`` (a whole Contact value; default ``<self.contact>``), answering one challenge."""
        contact_header = [("Contact", contact if contact is not None else f"<{self.contact}>")] if contact != "" else []
        uri = f"sip:{self.domain}"
        self.send(self.request("REGISTER", uri, headers=[*contact_header, *headers]))
        answer = self.read()
        if answer.status != 401:
            return answer
        challenge = next(
            value for value in answer.header_lines("www-authenticate") if f"algorithm={algorithm}" in value
        )
        credentials = digest_credentials(
            challenge, "REGISTER", uri, self.user, self.password if password is None else password
        )
        self.send(self.request("REGISTER", uri, headers=[*contact_header, *headers, ("Authorization", credentials)]))
        return self.read()
