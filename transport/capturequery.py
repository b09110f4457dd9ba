"""Reading the capture ring: calls grouped by Call-ID, filtered here so the console never pulls the whole ring.

Runs on the control socket's threads, never on an I/O thread. Each entry is
read once, the first time a query sees it (:class:`Summary`: Call-ID,
method or status, CSeq, From and To users), and the summaries are kept in
step with the ring: a query copies and parses only what arrived since the
last one and forgets what the ring evicted; the same question with nothing
carried since gets the last answer. Summaries hold no message text; the
``call`` op fetches and decodes one call's entries only.

Control ops (see :mod:`transport.control`):

* ``{"op": "calls", "call_id", "from_user", "to_user", "method", "status",
  "since", "until", "offset", "limit"}``: the calls that match, newest first
  (every filter optional; text filters are case-insensitive substrings,
  ``method`` and ``status`` match a call with such a request or response,
  ``since``/``until`` one with a message in that UNIX-time window), at most
  :data:`MAX_CALLS_PER_PAGE`, with ``total`` and the ring's statistics.
* ``{"op": "call", "call_id"}``: that call's messages in carried order (null
  when no captured message has that Call-ID), each with its text (the body
  only with ``capture_bodies``; the digest response, nonce and cnonce of
  Authorization and Proxy-Authorization redacted, :func:`redact_credentials`),
  at most the newest :data:`MAX_MESSAGES_PER_CALL` messages
  (``earlier_not_shown`` counts the older ones the ring still holds) and
  :data:`MAX_ANSWER_TEXT_BYTES` of text (``truncated`` says when either cut it).
"""

from __future__ import annotations

import functools
import itertools
import re
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sipwire.errors import ControlError
from sipwire.transport.capture import Captured, CaptureRing, decode
from sipwire.transport.connection import format_address
from sipwire.transport.sipuri import SipUriError, uri_of

#: One page of the call list; the console asks for fewer.
MAX_CALLS_PER_PAGE: Final = 200
#: A call with more messages than this (REGISTER refreshes on one Call-ID, a long dialog) keeps its newest.
MAX_MESSAGES_PER_CALL: Final = 1000
#: Message text in one ``call`` answer; beyond it, messages come without their text.
MAX_ANSWER_TEXT_BYTES: Final = 4 << 20
#: Longest text filter: a Call-ID or a user part, with room.
MAX_FILTER_CHARS: Final = 256
#: Entries copied from the ring, then summarized, at a time: the ring's lock is held for one such copy.
SUMMARY_CHUNK: Final = 4096
#: Entries of one call fetched from the ring under one hold of its lock.
PICK_CHUNK: Final = 64


@dataclass(frozen=True, slots=True)
class Summary:
    """What the call list and its filters need of one captured message (no text)."""

    seq: int
    time: float
    direction: str
    conn_id: int
    transport: str
    local: str
    remote: str
    trace_id: str
    call_id: str
    method: str  # request method; "" for a response
    status: int  # response status; 0 for a request
    reason: str
    cseq: str
    from_uri: str
    to_uri: str
    from_user: str
    to_user: str

    def view(self) -> dict[str, Any]:
        """The message as ``GET /api/calls/{call_id}`` lists it (``method`` or ``status``)."""
        view: dict[str, Any] = {
            "seq": self.seq, "time": self.time, "direction": self.direction, "connection": self.conn_id,
            "transport": self.transport, "local": self.local, "remote": self.remote, "cseq": self.cseq,
            "trace_id": self.trace_id or None,
        }  # fmt: skip
        if self.status:
            view["status"] = self.status
            view["reason"] = self.reason
        else:
            view["method"] = self.method
        return view


def _user(name_addr: str) -> tuple[str, str]:
    """(URI, user part) of a From or To value: what precedes '@' after the scheme; "" when there is none."""
    try:
        uri = uri_of(name_addr)
    except SipUriError:
        return name_addr[:200], ""
    _, colon, rest = uri.partition(":")
    user, at, _ = rest.partition("@")
    return uri, user.partition(";")[0] if colon and at else ""


#: The header lines a summary reads, full and compact forms (RFC 3261 section 7.3.3); one C-level scan.
_WANTED = re.compile(rb"\r\n(call-id|i|from|f|to|t|cseq)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_COMPACT: Final = {b"i": "call-id", b"f": "from", b"t": "to"}
#: How far into a message without CRLFCRLF the scan looks (it is not SIP; its first line is enough).
_SCAN_LIMIT: Final = 8192


def summarize(captured: Captured, earlier: Callable[[str], Summary | None] | None = None) -> Summary:
    """Read what the list needs from one captured message: a regular-expression scan, no validation.

    This runs for every message the ring takes while a console watches, on the transport's control
    thread: only the start line and four header values become text. Anything that is not SIP keeps
    its first line as its method. ``earlier`` gives the latest summary of a Call-ID, whose strings
    this one reuses.
    """
    raw = captured.raw
    end = raw.find(b"\r\n\r\n")
    end = end + 2 if end >= 0 else _SCAN_LIMIT
    found: dict[str, str] = {}
    for match in _WANTED.finditer(raw, 0, end):
        name = match.group(1).lower()
        key = _COMPACT.get(name) or name.decode("ascii")
        if key not in found:
            found[key] = match.group(2).decode("utf-8", "replace").strip()
    line = raw[: raw.find(b"\r\n") if b"\r\n" in raw[:end] else 60].decode("utf-8", "replace")
    method, status, reason = line[:60] or "?", 0, ""
    first, _, rest = line.partition(" ")
    if first == "SIP/2.0":
        code, _, reason = rest.partition(" ")
        if len(code) == 3 and code.isdigit():
            method, status = "", int(code)
    elif rest.endswith(" SIP/2.0"):
        method = first
    call_id = found.get("call-id", "")
    from_uri, from_user = _user(found.get("from", ""))
    to_uri, to_user = _user(found.get("to", ""))
    # A call's messages repeat these texts: they share the strings of the call's previous summary, so a
    # call holds one copy of each, freed with its last summary. Never sys.intern: these are the peers'
    # texts, and interned strings are not freed on some CPython builds (3.12.0 to 3.12.5, free-threaded).
    seen = earlier(call_id) if earlier is not None and call_id else None
    if seen is not None:
        call_id, remote = seen.call_id, _same(seen.remote, format_address(captured.remote))
        from_uri, from_user = _same(seen.from_uri, from_uri), _same(seen.from_user, from_user)
        to_uri, to_user = _same(seen.to_uri, to_uri), _same(seen.to_user, to_user)
        reason, cseq = _same(seen.reason, reason), _same(seen.cseq, found.get("cseq", ""))
    else:
        remote, cseq = format_address(captured.remote), found.get("cseq", "")
    return Summary(
        captured.seq, captured.time, captured.direction, captured.conn_id, captured.transport,
        _local_address(captured.local), remote, captured.trace_id, call_id, _METHODS.get(method, method), status,
        reason, cseq, from_uri, to_uri, from_user, to_user,
    )  # fmt: skip


def _same(earlier: str, text: str) -> str:
    """``earlier`` when it equals ``text``: one string object instead of two equal ones."""
    return earlier if earlier == text else text


#: The methods of RFC 3261 and its extensions, one string each (not interned: a fixed vocabulary).
_METHODS: Final = {
    name: name
    for name in ("INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "PRACK", "SUBSCRIBE", "NOTIFY",
                 "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE")
}  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _local_address(host_port: tuple[str, int]) -> str:
    """The transport's own addresses, one string each; bounded (ephemeral ports of outbound connections vary)."""
    return format_address(host_port)


@dataclass(frozen=True, slots=True)
class CallFilter:
    """The filters of the ``calls`` op, validated."""

    call_id: str = ""
    from_user: str = ""
    to_user: str = ""
    method: str = ""
    status: int = 0
    since: float = 0.0
    until: float = 0.0
    offset: int = 0
    limit: int = 50

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> CallFilter:
        texts = {name: _text(request, name) for name in ("call_id", "from_user", "to_user", "method")}
        status = _int(request, "status")
        if status and not 100 <= status <= 699:
            raise ControlError(f"status {status} is not a SIP status code (100..699)")
        limit = _int(request, "limit", 50)
        if not 1 <= limit <= MAX_CALLS_PER_PAGE:
            raise ControlError(f"limit {limit} is outside 1..{MAX_CALLS_PER_PAGE}")
        offset = _int(request, "offset")
        if offset < 0:
            raise ControlError(f"offset {offset} must not be negative")
        since, until = _float(request, "since"), _float(request, "until")
        return cls(
            texts["call_id"].lower(), texts["from_user"].lower(), texts["to_user"].lower(), texts["method"].upper(),
            status, since, until, offset, limit,
        )  # fmt: skip

    @property
    def unfiltered(self) -> bool:
        """No filter but paging: the page is a slice of the calls, none needs looking at."""
        return not (self.call_id or self.from_user or self.to_user or self.method or self.status or self.since
                    or self.until)  # fmt: skip

    def matches(self, messages: Sequence[Summary]) -> bool:
        first = messages[0]
        if self.call_id and self.call_id not in first.call_id.lower():
            return False
        if self.from_user and not any(self.from_user in m.from_user.lower() for m in messages):
            return False
        if self.to_user and not any(self.to_user in m.to_user.lower() for m in messages):
            return False
        if self.method and not any(m.method == self.method for m in messages):
            return False
        if self.status and not any(m.status == self.status for m in messages):
            return False
        if self.since and messages[-1].time < self.since:
            return False
        return not (self.until and first.time > self.until)


def _text(request: dict[str, Any], name: str) -> str:
    value = request.get(name, "")
    if not isinstance(value, str) or len(value) > MAX_FILTER_CHARS:
        raise ControlError(f"{name} must be a string of at most {MAX_FILTER_CHARS} characters, got {value!r:.80}")
    return value.strip()


def _int(request: dict[str, Any], name: str, default: int = 0) -> int:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"{name} must be an integer, got {value!r:.40}")
    return value


def _float(request: dict[str, Any], name: str) -> float:
    value = request.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ControlError(f"{name} must be a number, got {value!r:.40}")
    return float(value)


class _Call:
    """One Call-ID's summaries: the newest :data:`MAX_MESSAGES_PER_CALL`, and how many older ones were cut.

    A list read from ``head`` on, not a deque (most calls hold a few messages, and an empty deque
    alone costs 600 bytes): dropping the oldest moves ``head``, and the list is compacted once
    ``head`` passes half of it, so each message costs O(1) however long the call.
    """

    __slots__ = ("cut", "head", "held")

    def __init__(self) -> None:
        self.held: list[Summary] = []
        self.head = 0
        self.cut = 0  # older messages of the call the ring still holds, beyond the bound

    def add(self, summary: Summary) -> None:
        self.held.append(summary)
        if len(self.held) - self.head > MAX_MESSAGES_PER_CALL:
            self.head += 1
            self.cut += 1
            self._compact()

    def forget(self, gone: Summary) -> bool:
        """The ring evicted ``gone``, the oldest message of this call; True when the call has none left."""
        if self.head < len(self.held) and self.held[self.head] is gone:
            self.head += 1
            self._compact()
        else:
            self.cut -= 1  # one cut earlier (older than every message kept)
        return self.head == len(self.held)

    def _compact(self) -> None:
        if self.head * 2 > len(self.held):
            del self.held[: self.head]
            self.head = 0

    @property
    def messages(self) -> list[Summary]:
        return self.held[self.head :] if self.head else self.held

    @property
    def latest(self) -> Summary:
        return self.held[-1]


class CaptureQuery:
    """Summaries kept in step with a :class:`CaptureRing`, and the two control ops over them."""

    def __init__(self, ring: CaptureRing, bodies: bool) -> None:
        self.ring = ring
        self.bodies = bodies
        self._lock = threading.Lock()  # control clients each have a thread; a query holds it throughout
        self._summaries: deque[Summary] = deque()  # every entry the ring holds, in seq order
        # Call-ID -> its summaries in seq order. A dict keeps insertion order, which is the order of each
        # call's first message: reversed, newest first, with nothing to sort.
        self._calls: dict[str, _Call] = {}
        self._next_seq = 0
        #: The last ``calls`` answer, with its question and the ring's counts then (a page polls every 2 s).
        self._answered: tuple[CallFilter, dict[str, int], dict[str, Any]] | None = None

    def _refresh(self) -> dict[str, _Call]:
        """Summarize what arrived since the last query and forget what the ring evicted (the lock is held).

        Only the new entries are copied, :data:`SUMMARY_CHUNK` at a time, up to what the ring held when
        the query began (appends keep coming while it runs).
        """
        summaries, calls = self._summaries, self._calls
        until = self.ring.statistics()["appended"]
        while self._next_seq < until:
            first, entries = self.ring.entries(self._next_seq, min(SUMMARY_CHUNK, until - self._next_seq))
            start = max(first, self._next_seq)
            for offset, entry in enumerate(entries):
                summary = summarize(decode(start + offset, entry), self._latest)
                summaries.append(summary)
                if summary.call_id:
                    call = calls.get(summary.call_id)
                    if call is None:
                        call = calls[summary.call_id] = _Call()
                    call.add(summary)
            self._next_seq = start + len(entries)
        held = self.ring.statistics()
        oldest = held["appended"] - held["messages"]
        while summaries and summaries[0].seq < oldest:
            gone = summaries.popleft()
            if gone.call_id and calls[gone.call_id].forget(gone):
                del calls[gone.call_id]
        return calls

    def _latest(self, call_id: str) -> Summary | None:
        call = self._calls.get(call_id)
        return call.latest if call is not None else None

    def calls(self, request: dict[str, Any]) -> dict[str, Any]:
        wanted = CallFilter.from_request(request)
        end = wanted.offset + wanted.limit
        with self._lock:
            ring = self.ring.statistics()
            if self._answered is not None and self._answered[:2] == (wanted, ring):
                return self._answered[2]  # nothing appended or evicted since the same question: the same answer
            newest_first = reversed(self._refresh().values())
            if wanted.unfiltered:
                total = len(self._calls)
                page = list(itertools.islice(newest_first, wanted.offset, end))
            else:
                matching = [call for call in newest_first if wanted.matches(call.messages)]
                total, page = len(matching), matching[wanted.offset : end]
            views = [_call_view(call.messages, call.cut) for call in page]
            answer = {"total": total, "calls": views, "capture": {**ring, "bodies": self.bodies}}
            self._answered = (wanted, ring, answer)
        return answer

    def call(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """One call's messages with their text; None when no captured message has that Call-ID."""
        call_id = request.get("call_id")
        if not isinstance(call_id, str) or not call_id or len(call_id) > MAX_FILTER_CHARS:
            raise ControlError(f"call_id must be a non-empty string of at most {MAX_FILTER_CHARS} characters")
        with self._lock:
            call = self._refresh().get(call_id)
            if call is None:
                return None
            messages, cut = list(call.messages), call.cut
        truncated = cut > 0
        seqs = [m.seq for m in messages]
        entries = [e for at in range(0, len(seqs), PICK_CHUNK) for e in self.ring.picked(seqs[at : at + PICK_CHUNK])]
        # A message queued on an outbound connection before its connect finished names local port 0 (no
        # address was bound yet): the connection's later messages know the address it got.
        bound = {m.conn_id: m.local for m in messages if not m.local.endswith(":0")}
        views, text_bytes = [], 0
        for summary, entry in zip(messages, entries, strict=True):
            view = summary.view()
            view["local"] = bound.get(summary.conn_id, summary.local)
            if entry is not None and text_bytes < MAX_ANSWER_TEXT_BYTES:
                view.update(self._text(decode(summary.seq, entry).raw))
                text_bytes += len(view["text"])
            else:
                truncated = True  # evicted since the summary was made, or over the answer's text budget
            views.append(view)
        return {**_call_view(messages, cut), "messages": views, "earlier_not_shown": cut, "truncated": truncated,
                **self._ring_view()}  # fmt: skip

    def _text(self, raw: bytes) -> dict[str, Any]:
        """A message's text for readers: the header block, and the body only with ``capture_bodies``."""
        end = raw.find(b"\r\n\r\n")
        head, body = (raw, b"") if end < 0 else (raw[: end + 4], raw[end + 4 :])
        head = redact_credentials(head)
        shown = head + body if self.bodies else head
        # surrogateescape: bytes that are not UTF-8 survive the JSON hop (the pcap needs the exact bytes).
        return {"text": shown.decode("utf-8", "surrogateescape"), "body_bytes": len(body),
                "body_withheld": bool(body) and not self.bodies}  # fmt: skip

    def _ring_view(self) -> dict[str, Any]:
        return {"capture": {**self.ring.statistics(), "bodies": self.bodies}}


#: An Authorization or Proxy-Authorization header line, with any continuation lines.
_CREDENTIALS = re.compile(
    rb"^(?:proxy-)?authorization[ \t]*:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", re.IGNORECASE | re.MULTILINE
)
#: The digest parameters from which, together, a password can be guessed offline (RFC 7616 digest).
_SECRET_PARAMETER = re.compile(rb"\b(response|nonce|cnonce)([ \t]*=[ \t]*)(\"[^\"]*\"|[^,\s]*)", re.IGNORECASE)
#: What readers see instead of a digest response, nonce or cnonce.
REDACTED: Final = b'"redacted"'


def redact_credentials(head: bytes) -> bytes:
    """A header block with the digest response, nonce and cnonce of its credentials replaced by :data:`REDACTED`.

    Username and realm stay: they say who tried; the rest would let a reader of the console or its
    pcap guess the password offline.
    """
    return _CREDENTIALS.sub(lambda line: _SECRET_PARAMETER.sub(rb"\1\2" + REDACTED, line.group(0)), head)


def _call_view(messages: Sequence[Summary], cut: int) -> dict[str, Any]:
    """A call as ``GET /api/calls`` lists it (``cut``: its older messages beyond the per-call bound)."""
    first = messages[0]
    requests = [m for m in messages if not m.status]
    opener = requests[0] if requests else first
    statuses = [m.status for m in messages if m.status]
    return {
        "call_id": first.call_id,
        "first_method": opener.method or opener.cseq.partition(" ")[2],
        "from": opener.from_uri, "to": opener.to_uri, "from_user": opener.from_user, "to_user": opener.to_user,
        "started": first.time, "last": messages[-1].time, "messages": len(messages) + cut,
        "last_status": statuses[-1] if statuses else None,
        "connections": sorted({m.conn_id for m in messages}),
        "traced": any(m.trace_id for m in messages),
    }  # fmt: skip
