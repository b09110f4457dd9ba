"""Write-job outcomes: what the transport reports back for every write job."""

from __future__ import annotations

from enum import Enum


class WriteResult(Enum):
    """How a write job ended. ``code`` goes on the wire, ``label`` into counters and logs."""

    SENT = (0, "sent")
    REFUSED = (1, "refused")
    TIMEOUT = (2, "timeout")
    RESET = (3, "reset")
    QUEUE_FULL = (4, "queue_full")
    CONNECTION_GONE = (5, "connection_gone")
    UNREACHABLE = (6, "unreachable")
    BAD_DESTINATION = (7, "bad_destination")
    SHUTDOWN = (8, "shutdown")
    LIMIT_REACHED = (9, "limit_reached")
    TOO_LARGE = (10, "too_large")
    TLS_FAILED = (11, "tls_failed")
    UNRESOLVABLE = (12, "unresolvable")

    def __init__(self, code: int, label: str) -> None:
        self.code = code
        self.label = label

    @classmethod
    def from_code(cls, code: int) -> WriteResult:
        try:
            return _BY_CODE[code]
        except KeyError:
            raise ValueError(f"unknown write result code {code}") from None


_BY_CODE = {result.code: result for result in WriteResult}
