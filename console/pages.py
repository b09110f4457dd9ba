"""Full HTML pages, and the login form that turns the admin token into a browser session.

Live parts of each page poll the REST route that owns the same figures
(:mod:`console.api`), which answers htmx with the page's named block. The
traces list polls ``GET /api/traces`` (:mod:`console.otlp`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Final, Literal
from urllib.parse import parse_qs

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from sipwire.console import views
from sipwire.console.auth import CSRF_FIELD, SESSION_COOKIE, SESSION_SECONDS, same_origin
from sipwire.console.otlp import TRACES_LISTED
from sipwire.console.source import TransportDownError, TransportRefusedError

if TYPE_CHECKING:
    from sipwire.console.state import Console

#: The login form's body is one token and a path: anything longer is not a login.
MAX_LOGIN_BODY: Final = 4096


def _safe_next(target: str | None) -> str:
    """Only a path on this console: never another host (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def build_router(console: Console) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    source, history, renderer, auth = console.source, console.history, console.renderer, console.auth

    @router.get("/")
    def overview(request: Request) -> Response:
        context = console.context(request, page="overview", **views.overview_context(source, history))
        return renderer.page("overview.html", context)

    @router.get("/connections")
    def connections(
        request: Request,
        state: str = "",
        proto: views.Proto = "",
        q: Annotated[str, Query(max_length=200)] = "",
        sort: Annotated[str, Query(max_length=40)] = "id",
        order: Literal["asc", "desc"] = "asc",
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> Response:
        query = views.ConnectionQuery(
            state or None, proto or None, q.strip(), sort if sort in views.SORT_KEYS else "id", order, offset, limit
        )
        context = console.context(request, page="connections", **views.connections_context(source, history, query))
        return renderer.page("connections.html", context)

    @router.get("/connections/{conn_id}")
    def connection(request: Request, conn_id: Annotated[int, Path(ge=1)]) -> Response:
        try:
            conn: dict[str, Any] | None = source.connection(conn_id)
            error = ""
        except (TransportDownError, TransportRefusedError) as failure:
            conn, error = None, str(failure)
        context = views.status_context(source, history) | {"conn": conn, "conn_id": conn_id, "error": error}
        return renderer.page("connection.html", console.context(request, page="connections", **context))

    @router.get("/threads")
    def threads(request: Request) -> Response:
        context = console.context(request, page="threads", **views.threads_context(source, history))
        return renderer.page("threads.html", context)

    @router.get("/traces")
    def traces(request: Request) -> Response:
        context = console.context(
            request,
            page="traces",
            traces=console.traces.recent(TRACES_LISTED),
            store=console.traces.figures(),
            **views.status_context(source, history),
        )
        return renderer.page("traces.html", context)

    @router.get("/traces/{trace_id}")
    def trace(request: Request, trace_id: Annotated[str, Path(pattern="^[0-9a-fA-F]{32}$")]) -> Response:
        found = console.traces.get(trace_id)
        context = console.context(
            request, page="traces", trace=found, trace_id=trace_id.lower(), **views.status_context(source, history)
        )
        return renderer.page("trace.html", context, 200 if found is not None else 404)

    @router.get("/login")
    def login_form(request: Request, next: str = "/") -> Response:
        context = console.context(
            request, page="login", error="", next=_safe_next(next), **views.status_context(source, history)
        )
        return renderer.page("login.html", context)

    @router.post("/login")
    async def login(request: Request) -> Response:
        body = await request.body()
        fields = parse_qs(body[:MAX_LOGIN_BODY].decode("utf-8", "replace"))
        token = (fields.get("token") or [""])[-1]
        target = _safe_next((fields.get("next") or ["/"])[-1])
        if not same_origin(request) or len(body) > MAX_LOGIN_BODY or not auth.token_matches(token):
            status = await run_in_threadpool(views.status_context, source, history)
            context = console.context(
                request, page="login", error="That is not the admin token.", next=target, **status
            )
            return renderer.page("login.html", context, 401)
        session = auth.open_session()
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            max_age=int(SESSION_SECONDS),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        body = await request.body()
        fields = parse_qs(body[:MAX_LOGIN_BODY].decode("utf-8", "replace"))
        session = auth.session(request)
        if session is not None and auth.admin_reason(request, (fields.get(CSRF_FIELD) or [""])[-1]) is None:
            auth.end_session(session.id)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return router
