"""The REST API (the contract in ARCHITECTURE.md) and ``/metrics``.

Each route answers JSON to API clients and, to htmx (``HX-Request: true``),
the HTML block of the page that shows the same figures: the page polls the
API itself, as fasthx does. Reads need no token; ``PUT /api/threads`` and
``DELETE /api/connections/{id}`` need the admin token (bearer) or a logged-in
browser session with its CSRF token (:mod:`console.auth`).

Status codes: 401 without admin rights, 422 for an invalid body or query
(with the reason), 404 for an unknown connection, 409 when the transport
refuses a change, 503 while the transport is down (``/api/health`` still
answers 200 and says ``down``).
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import APIRouter, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, PlainTextResponse, Response

from sipwire.console import metrics, views
from sipwire.console.models import (
    Closed,
    ConnectionList,
    Health,
    Problem,
    Stats,
    ThreadsResize,
    ThreadsState,
)
from sipwire.console.render import is_htmx
from sipwire.console.source import TransportDownError, TransportRefusedError
from sipwire.transport.connection import ConnectionInfo

if TYPE_CHECKING:
    from sipwire.console.state import Console

SortKey = Literal[
    "id", "transport", "state", "local", "remote", "thread", "age", "idle", "bytes_in", "bytes_out",
    "messages_in", "messages_out", "pending_write_bytes", "tls_handshake_ms",
]  # fmt: skip

ERRORS: dict[int | str, dict[str, Any]] = {503: {"model": Problem, "description": "the transport is down"}}
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    401: {"model": Problem, "description": "admin token missing or wrong"},
    409: {"model": Problem, "description": "the transport refused the change"},
}


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _unauthorized(reason: str) -> JSONResponse:
    return _problem(401, reason, {"WWW-Authenticate": 'Bearer realm="sipwire"'})


def _invalid(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def build_router(console: Console) -> APIRouter:
    router = APIRouter()
    source, history, renderer, auth = console.source, console.history, console.renderer, console.auth
    resize_schema = ThreadsResize.model_json_schema()
    resize_schema["properties"]["size"]["maximum"] = console.settings.max_threads  # the transport's own bound applies

    @router.get("/api/health", response_model=Health, tags=["transport"], summary="Transport up or down")
    def get_health(request: Request) -> Any:
        try:
            health = source.health()
        except (TransportDownError, TransportRefusedError):
            health = None
        if is_htmx(request):
            context = console.context(request, **views.status_context(source, history))
            return renderer.block("base.html", "status", context)
        liveness = source.liveness()
        instance, reads_from = console.settings.instance, source.reads_from
        if health is None:
            return Health(
                status="down", pid=liveness.pid, down_since=liveness.since, down_for=round(liveness.for_seconds(), 3),
                error=liveness.error, instance=instance, reads_from=reads_from,
            )  # fmt: skip
        return Health(
            status="up", pid=health["pid"], uptime=health["uptime"], listening=health["listening"],
            threads=health.get("threads"), workers=health.get("workers"), instance=instance,
            reads_from=reads_from,
        )  # fmt: skip

    @router.get("/api/threads", response_model=ThreadsState, responses=ERRORS, tags=["threads"])
    def get_threads(request: Request) -> Any:
        if is_htmx(request):
            return renderer.block(
                "threads.html", "pool", console.context(request, **views.threads_context(source, history))
            )
        try:
            return ThreadsState.model_validate(source.threads())
        except TransportDownError as error:
            return _problem(503, f"transport down: {error}")

    @router.put(
        "/api/threads",
        response_model=ThreadsState,
        responses={**ADMIN_ERRORS, 422: {"description": "size is not an integer in 1..max_threads"}},
        tags=["threads"],
        summary="Resize the I/O pool at runtime; answers the new state",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": resize_schema},
                    "application/x-www-form-urlencoded": {"schema": resize_schema},
                },
            }
        },
    )
    async def put_threads(request: Request) -> Any:
        data, form_csrf, parse_error = await _body(request)
        reason = auth.admin_reason(request, form_csrf)
        htmx = is_htmx(request)
        if reason is not None:
            if htmx:
                return await _threads_block(request, f"Not allowed: {reason}.", 401)
            return _unauthorized(reason)
        errors = parse_error or _resize_errors(data, await run_in_threadpool(_max_threads))
        if errors:
            if htmx:
                return await _threads_block(request, f"Invalid size: {errors[0]['msg']}.", 422)
            return _invalid(errors)
        size = ThreadsResize.model_validate(data).size
        try:
            state = await run_in_threadpool(source.resize, size)
        except TransportDownError as error:
            return await _threads_block(request, "The transport is down.", 503) if htmx else _problem(503, str(error))
        except TransportRefusedError as error:
            return await _threads_block(request, str(error), 409) if htmx else _problem(409, str(error))
        history.refresh()
        if htmx:
            return await _threads_block(request, "", 200, notice=f"I/O pool resized to {size} threads.")
        return ThreadsState.model_validate(state)

    def _max_threads() -> int:
        """The transport's own bound (its settings may differ from the console's); the console's if it is down."""
        try:
            return int(source.threads()["max"])
        except (TransportDownError, TransportRefusedError, KeyError, TypeError, ValueError):
            return console.settings.max_threads

    async def _threads_block(request: Request, error: str, status: int, notice: str = "") -> Response:
        context = await run_in_threadpool(views.threads_context, source, history, error, notice)
        return renderer.block("threads.html", "pool", console.context(request, **context), status)

    @router.get("/api/connections", response_model=ConnectionList, responses=ERRORS, tags=["connections"])
    def list_connections(
        request: Request,
        state: Annotated[str | None, Query(description="only this state, e.g. open, handshake, connecting")] = None,
        proto: Annotated[views.Proto | None, Query(description="only tcp, tls, ws or wss")] = None,
        limit: Annotated[int, Query(ge=1, le=100_000, description="at most this many")] = 100,
        offset: Annotated[int, Query(ge=0, description="skip this many first (paging)")] = 0,
        sort: Annotated[SortKey, Query(description="sort by this field")] = "id",
        order: Annotated[Literal["asc", "desc"], Query()] = "asc",
        q: Annotated[str, Query(max_length=200, description="substring of local or remote address, or an id")] = "",
    ) -> Any:
        query = views.ConnectionQuery(state or None, proto or None, q.strip(), sort, order, offset, limit)
        if is_htmx(request):
            context = views.connections_context(source, history, query)
            return renderer.block("connections.html", "table", console.context(request, **context))
        try:
            return ConnectionList.model_validate(views.select_connections(source, query))
        except TransportDownError as error:
            return _problem(503, f"transport down: {error}")

    @router.get(
        "/api/connections/{conn_id}",
        response_model=ConnectionInfo,
        responses={**ERRORS, 404: {"model": Problem}},
        tags=["connections"],
    )
    def get_connection(request: Request, conn_id: Annotated[int, Path(ge=1)]) -> Any:
        try:
            connection: dict[str, Any] | None = source.connection(conn_id)
            error = ""
        except (TransportDownError, TransportRefusedError) as failure:
            connection, error = None, str(failure)
        if is_htmx(request):
            context = views.status_context(source, history) | {"conn": connection, "conn_id": conn_id, "error": error}
            return renderer.block("connection.html", "detail", console.context(request, **context))
        if connection is None:
            return _problem(503 if not source.liveness().up else 404, error)
        return connection

    @router.delete(
        "/api/connections/{conn_id}",
        response_model=Closed,
        responses={**ADMIN_ERRORS, 404: {"model": Problem}},
        tags=["connections"],
        summary="Close one connection (admin)",
    )
    async def close_connection(request: Request, conn_id: Annotated[int, Path(ge=1)]) -> Any:
        reason = auth.admin_reason(request)
        htmx = is_htmx(request)
        if reason is not None:
            return _close_block(request, conn_id, f"Not allowed: {reason}.", 401) if htmx else _unauthorized(reason)
        try:
            result = await run_in_threadpool(source.close_connection, conn_id)
        except TransportDownError as error:
            return _close_block(request, conn_id, "The transport is down.", 503) if htmx else _problem(503, str(error))
        except TransportRefusedError as error:
            return _close_block(request, conn_id, str(error), 404) if htmx else _problem(404, str(error))
        history.refresh()
        if htmx:
            return _close_block(request, conn_id, "", 200)
        return Closed.model_validate(result)

    def _close_block(request: Request, conn_id: int, error: str, status: int) -> Response:
        context = {"conn_id": conn_id, "error": error, "closed_at": time.time()}
        return renderer.block("connection.html", "closed", console.context(request, **context), status)

    @router.get("/api/stats", response_model=Stats, responses=ERRORS, tags=["transport"])
    def get_stats(request: Request) -> Any:
        if is_htmx(request):
            return renderer.block(
                "overview.html", "live", console.context(request, **views.overview_context(source, history))
            )
        try:
            return Stats.model_validate(source.stats())
        except TransportDownError as error:
            return _problem(503, f"transport down: {error}")

    @router.get("/metrics", response_class=PlainTextResponse, tags=["transport"], summary="Prometheus exposition")
    def get_metrics() -> Response:
        try:
            health: dict[str, Any] | None = source.health()
            stats: dict[str, Any] | None = source.stats()
        except (TransportDownError, TransportRefusedError):
            health = stats = None
        latest = history.latest()
        by_proto = latest.by_proto if latest is not None and latest.up else {}
        text = metrics.render(source.liveness(), health, stats, by_proto, console.traces)
        return Response(text, media_type=metrics.CONTENT_TYPE)

    return router


async def _body(request: Request) -> tuple[dict[str, Any], str | None, list[dict[str, Any]]]:
    """The body as a dict (JSON or form), the form's CSRF field, and parse errors in 422 shape."""
    raw = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":
        fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        data = {name: values[-1] for name, values in fields.items() if name != "csrf"}
        csrf_values = fields.get("csrf")
        return data, csrf_values[-1] if csrf_values else None, []
    try:
        document = json.loads(raw, parse_float=_finite, parse_constant=_finite) if raw else None
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        return {}, None, [{"type": "json_invalid", "loc": ["body"], "msg": f"body is not JSON: {error}", "input": None}]
    if not isinstance(document, dict):
        return (
            {},
            None,
            [
                {
                    "type": "model_type",
                    "loc": ["body"],
                    "msg": 'body must be a JSON object like {"size": 4}',
                    "input": document,
                }
            ],
        )
    return document, None, []


def _finite(text: str) -> float:
    """A JSON number as a float, refused when not finite (1e309, NaN): a 422 could not echo it back as JSON."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _resize_errors(data: dict[str, Any], max_threads: int) -> list[dict[str, Any]]:
    if isinstance(data.get("size"), bool):
        return [
            {
                "type": "int_type",
                "loc": ["body", "size"],
                "msg": "Input should be a valid integer",
                "input": data["size"],
            }
        ]
    try:
        resize = ThreadsResize.model_validate(data)
    except ValidationError as error:
        return [{**e, "loc": ["body", *e["loc"]]} for e in error.errors(include_url=False, include_context=False)]
    if resize.size > max_threads:
        return [
            {
                "type": "less_than_equal",
                "loc": ["body", "size"],
                "msg": f"Input should be less than or equal to {max_threads} (max_threads)",
                "input": resize.size,
            }
        ]
    return []
