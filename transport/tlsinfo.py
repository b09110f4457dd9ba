"""Facts about a TLS connection, as plain data: what workers and tools may see.

Kept apart from :mod:`transport.tls` so that workers never import OpenSSL.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """Facts about an established TLS connection, safe to hand to workers and tools."""

    version: str
    cipher: str
    handshake_ms: float
    server_name: str
    peer_subject: str
    peer_not_after: str

    def encode(self) -> str:
        """One line for the wire envelope: fields joined by TAB."""
        return "\t".join(
            (self.version, self.cipher, f"{self.handshake_ms:.3f}", self.server_name, self.peer_subject,
             self.peer_not_after)
        )  # fmt: skip

    @classmethod
    def decode(cls, text: str) -> TlsInfo | None:
        if not text:
            return None
        parts = text.split("\t")
        if len(parts) != 6:
            return None
        version, cipher, handshake_ms, server_name, subject, not_after = parts
        return cls(version, cipher, float(handshake_ms), server_name, subject, not_after)
