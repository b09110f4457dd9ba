"""The ladder of one call: who the participants are, and one arrow per message between two of them.

The transport is one participant, whatever local address a message used (a
proxy answers on its listener and forwards from an ephemeral port): its
column lists those addresses. Every peer address is a participant of its own,
labelled with the connections it used. Columns go in order of first
appearance, the transport second, so a call through the proxy reads caller,
sipwire, callee from left to right. Arrows carry the method or the status,
and the time since the previous message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

TRANSPORT_COLUMN_NAME = "sipwire"


@dataclass(frozen=True, slots=True)
class Participant:
    name: str
    addresses: tuple[str, ...]
    connections: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Arrow:
    """One message on the ladder: from column ``source`` to column ``target`` (0-based)."""

    message: dict[str, Any]
    source: int
    target: int
    label: str
    kind: str  # "request", "provisional", "success", "failure"
    delta_ms: float | None  # since the previous message; None for the first

    @property
    def left(self) -> int:
        return min(self.source, self.target)

    @property
    def span(self) -> int:
        """Columns the arrow's grid area covers (an arrow runs between the centres of its end columns)."""
        return abs(self.source - self.target) + 1

    @property
    def rightward(self) -> bool:
        return self.target > self.source


def call_path(call_id: str) -> str:
    """A Call-ID as one path segment ('/' and every other reserved character escaped; '@' kept)."""
    return quote(call_id, safe="@")


def _kind(message: dict[str, Any]) -> str:
    status = message.get("status")
    if not status:
        return "request"
    if status < 200:
        return "provisional"
    return "success" if status < 300 else "failure"


def _label(message: dict[str, Any]) -> str:
    status = message.get("status")
    if status:
        return f"{status} {message.get('reason') or ''}".strip()
    return str(message.get("method") or "?")


def ladder(messages: list[dict[str, Any]]) -> tuple[list[Participant], list[Arrow]]:
    """Participants and arrows of a call's messages (as the ``call`` control op lists them, in carried order)."""
    order: list[str] = []  # peer addresses, and TRANSPORT_COLUMN_NAME, by first appearance
    local_addresses: dict[str, None] = {}
    peer_connections: dict[str, dict[int, None]] = {}
    local_connections: dict[int, None] = {}
    for message in messages:
        remote = message["remote"]
        if remote not in order:
            order.append(remote)
            if len(order) == 1:
                order.append(TRANSPORT_COLUMN_NAME)
        local_addresses[message["local"]] = None
        peer_connections.setdefault(remote, {})[message["connection"]] = None
        local_connections[message["connection"]] = None
    columns = {name: index for index, name in enumerate(order)}
    participants = [
        Participant(TRANSPORT_COLUMN_NAME, tuple(local_addresses), tuple(local_connections))
        if name == TRANSPORT_COLUMN_NAME
        else Participant(name, (name,), tuple(peer_connections[name]))
        for name in order
    ]
    arrows: list[Arrow] = []
    previous: float | None = None
    here = columns.get(TRANSPORT_COLUMN_NAME, 0)
    for message in messages:
        peer = columns[message["remote"]]
        source, target = (here, peer) if message["direction"] == "out" else (peer, here)
        delta = None if previous is None else (message["time"] - previous) * 1000.0
        arrows.append(Arrow(message, source, target, _label(message), _kind(message), delta))
        previous = message["time"]
    return participants, arrows
