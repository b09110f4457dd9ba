"""Call flows: ``GET /api/calls``, a call's messages and pcap under ``/api/calls/``, pages ``/calls``, ``/calls/ID``.

The transport keeps the messages it carried in its capture ring and filters
them itself (:mod:`transport.capturequery`, control ops ``calls`` and
``call``), so a page never pulls the whole ring. A Call-ID may hold ``/``
and ``@``: the routes take the rest of the path, so ``/api/calls/a/b@host``
names Call-ID ``a/b@host`` (clients may also send ``%2F``); a path ending
in ``.pcap`` asks for the export. Captured SIP is user data: these routes
are reads like any other, behind the console's read rules
(:mod:`console.guard`: the admin token beyond loopback); the transport has
redacted the digest credentials in the text they get.

Status codes: 404 for a Call-ID the capture does not hold, 422 for an
invalid filter (with the reason), 503 while the transport is down or its
capture is off.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from sipwire.console import views
from sipwire.console.ladder import call_path, ladder
from sipwire.console.models import CallDetail, CallList, Problem
from sipwire.console.pcap import MEDIA_TYPE, PcapMessage, parse_address, withheld_body, write_pcap
from sipwire.console.render import is_htmx
from sipwire.console.source import CaptureSlowError, TransportDownError, TransportRefusedError

if TYPE_CHECKING:
    from sipwire.console.state import Console

#: Longest Call-ID or user filter (the transport's own bound).
MAX_TEXT: Final = 256
#: Calls per page of the list.
PAGE_SIZES: Final = (25, 50, 100, 200)
#: The page's "within the last" choices, in seconds (0: any time).
WINDOWS: Final = ((0, "any time"), (300, "5 minutes"), (900, "15 minutes"), (3600, "hour"), (86400, "day"))
#: The latest UNIX time a filter may name (year 5138): keeps floats finite and meaningful.
MAX_TIME: Final = 1e11

ERRORS: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Problem,
        "description": "the transport is down, its capture is off, or a capture query took too long",
    },
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": Problem, "description": "the capture holds no message with that Call-ID"},
}
PCAP_ANSWER: Final[dict[str, Any]] = {
    "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    "description": "classic pcap, link type RAW: synthesized IPv4/IPv6 and TCP packets",
}
CallIdPath = Annotated[
    str, Path(min_length=1, max_length=MAX_TEXT, description="the Call-ID ('/' may be sent as is or as %2F)")
]


@dataclass(frozen=True, slots=True)
class CallQuery:
    """The list's filters, as query parameters of both ``GET /api/calls`` and the page (empty: no filter)."""

    call_id: str
    from_user: str
    to_user: str
    method: str
    status: str
    since: float
    until: float
    last: int
    offset: int
    limit: int

    def control_arguments(self, now: float) -> dict[str, Any]:
        """The ``calls`` control op's arguments."""
        arguments: dict[str, Any] = {"offset": self.offset, "limit": self.limit}
        for name in ("call_id", "from_user", "to_user", "method"):
            if value := getattr(self, name).strip():
                arguments[name] = value
        if self.status:
            arguments["status"] = int(self.status)
        since = now - self.last if self.last else self.since
        if since:
            arguments["since"] = since
        if self.until:
            arguments["until"] = self.until
        return arguments


def call_query(
    call_id: Annotated[str, Query(max_length=MAX_TEXT, description="part of the Call-ID")] = "",
    from_user: Annotated[str, Query(max_length=MAX_TEXT, description="part of the From user")] = "",
    to_user: Annotated[str, Query(max_length=MAX_TEXT, description="part of the To user")] = "",
    method: Annotated[str, Query(pattern=r"^[A-Za-z]{0,32}$", description="calls with a request of it")] = "",
    status: Annotated[str, Query(pattern=r"^([1-6][0-9][0-9])?$", description="calls with a response of it")] = "",
    since: Annotated[float, Query(ge=0, le=MAX_TIME, allow_inf_nan=False, description="UNIX time")] = 0.0,
    until: Annotated[float, Query(ge=0, le=MAX_TIME, allow_inf_nan=False, description="UNIX time")] = 0.0,
    last: Annotated[int, Query(ge=0, le=10**8, description="seconds back from now (instead of since)")] = 0,
    offset: Annotated[int, Query(ge=0, le=10**6)] = 0,
    limit: Annotated[int, Query(ge=1, le=max(PAGE_SIZES))] = 50,
) -> CallQuery:
    return CallQuery(call_id, from_user, to_user, method, status, since, until, last, offset, limit)


def _problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _filename(call_id: str) -> str:
    return "call-" + (re.sub(r"[^A-Za-z0-9._-]", "_", call_id)[:80] or "_") + ".pcap"


def pcap_of(call: dict[str, Any]) -> bytes:
    """The call's messages as a pcap (:mod:`console.pcap`); withheld bodies are re-framed as having none."""
    packets = []
    for message in call["messages"]:
        text = message.get("text")
        if text is None:
            continue  # beyond the answer's bounds: not in this export
        data = text.encode("utf-8", "surrogateescape")
        if message.get("body_withheld"):
            data = withheld_body(data, message["body_bytes"])
        packets.append(PcapMessage(
            message["time"], message["direction"] == "out", message["connection"],
            parse_address(message["local"]), parse_address(message["remote"]), data,
        ))  # fmt: skip
    return write_pcap(packets)


def _readable(call: dict[str, Any]) -> dict[str, Any]:
    """The call for JSON and HTML: message bytes that are not UTF-8 become U+FFFD (the pcap keeps them)."""
    for message in call["messages"]:
        if message.get("text") is not None:
            message["text"] = message["text"].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return call


def build_router(console: Console) -> APIRouter:
    router = APIRouter()
    source, history, renderer = console.source, console.history, console.renderer

    def read_calls(query: CallQuery) -> tuple[dict[str, Any] | None, str]:
        try:
            return source.calls(**query.control_arguments(time.time())), ""
        except (TransportDownError, TransportRefusedError, CaptureSlowError) as error:
            return None, str(error)

    def read_call(call_id: str) -> tuple[dict[str, Any] | None, str]:
        try:
            return source.call(call_id), ""
        except (TransportDownError, TransportRefusedError, CaptureSlowError) as error:
            return None, str(error)

    def list_context(request: Request, query: CallQuery) -> dict[str, Any]:
        found, error = read_calls(query)
        calls = found["calls"] if found else []
        for call in calls:
            call["href"] = f"/calls/{call_path(call['call_id'])}"
        total = found["total"] if found else 0
        return console.context(
            request, page="calls", query=query, calls=calls, total=total, error=error,
            capture=found["capture"] if found else None, page_sizes=PAGE_SIZES, windows=WINDOWS,
            prev_offset=max(0, query.offset - query.limit) if query.offset else None,
            next_offset=query.offset + query.limit if query.offset + query.limit < total else None,
            **views.status_context(source, history),
        )  # fmt: skip

    @router.get("/api/calls", response_model=CallList, responses=ERRORS, tags=["calls"], summary="Captured calls")
    def get_calls(request: Request, query: Annotated[CallQuery, Depends(call_query)]) -> Any:
        """Calls in the transport's capture ring, newest first, filtered by the transport."""
        if is_htmx(request):
            return renderer.block("calls.html", "list", list_context(request, query))
        found, error = read_calls(query)
        if found is None:
            return _problem(503, error)
        return CallList.model_validate(found)

    @router.get(
        "/api/calls/{call_id:path}.pcap",
        response_class=Response,
        responses={200: PCAP_ANSWER, **NOT_FOUND},
        tags=["calls"],
        summary="A captured call as a pcap file",
    )
    async def get_call_pcap(call_id: CallIdPath) -> Response:
        call, error = await run_in_threadpool(read_call, call_id)
        if call is None:
            return _problem(503, error) if error else _problem(404, f"no captured call with Call-ID {call_id!r}")
        headers = {"Content-Disposition": f'attachment; filename="{_filename(call_id)}"'}
        return Response(await run_in_threadpool(pcap_of, call), media_type=MEDIA_TYPE, headers=headers)

    @router.get(
        "/api/calls/{call_id:path}", response_model=CallDetail, responses=NOT_FOUND, tags=["calls"],
        summary="A captured call's messages, in the order carried",
    )  # fmt: skip
    def get_call(call_id: CallIdPath) -> Any:
        call, error = read_call(call_id)
        if call is None:
            return _problem(503, error) if error else _problem(404, f"no captured call with Call-ID {call_id!r}")
        return CallDetail.model_validate(_readable(call))

    @router.get("/calls", include_in_schema=False)
    def calls_page(request: Request, query: Annotated[CallQuery, Depends(call_query)]) -> Response:
        return renderer.page("calls.html", list_context(request, query))

    @router.get("/calls/{call_id:path}", include_in_schema=False)
    def call_page(request: Request, call_id: CallIdPath) -> Response:
        call, error = read_call(call_id)
        participants, arrows = ladder(_readable(call)["messages"]) if call is not None else ([], [])
        context = console.context(
            request, page="calls", call=call, call_id=call_id, error=error, participants=participants,
            arrows=arrows, pcap_href=f"/api/calls/{call_path(call_id)}.pcap",
            **views.status_context(source, history),
        )  # fmt: skip
        return renderer.page("call.html", context, 200 if call is not None else (503 if error else 404))

    return router
