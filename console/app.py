"""The application factory: one :class:`Console` holds every part; routes get it explicitly.

``create_app(settings)`` finds the templates and browser assets, sets up the
admin token, the data source, the sampler and the trace store, and mounts:

* ``/api/...`` and ``/metrics`` (:mod:`console.api`),
* the registrar: ``/registrations``, ``/api/registrations``, ``/api/users`` (:mod:`console.registrar`),
* call flows: ``/calls``, ``/api/calls`` and a call's ladder and pcap (:mod:`console.calls`),
* the pages and the login form (:mod:`console.pages`),
* ``/v1/traces`` (:mod:`console.otlp`),
* ``/assets/htmx/`` and ``/assets/swagger-ui/`` -- files of the pinned npm
  packages ``htmx.org`` and ``swagger-ui-dist`` (:mod:`console.assets`),
* ``/docs`` -- Swagger UI on ``/openapi.json``, every file served from here:
  no CDN, no fonts or validator badge from elsewhere (ReDoc, which needs a
  CDN and web fonts, is not offered).

The sampler runs for the lifetime of the app (FastAPI lifespan), so it
starts with uvicorn and stops with it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from sipwire.config import Settings
from sipwire.console import api, calls, pages, registrar
from sipwire.console.assets import SWAGGER_UI_CSS, SWAGGER_UI_FAVICON, SWAGGER_UI_JS, find_assets
from sipwire.console.auth import Auth, load_or_generate_token
from sipwire.console.guard import AccessGuard, AccessPolicy
from sipwire.console.history import History
from sipwire.console.otlp import build_router
from sipwire.console.render import Renderer
from sipwire.console.source import TransportSource
from sipwire.console.state import Console
from sipwire.console.tracestore import TraceStore

log = logging.getLogger("sipwire.console")

HTMX_URL = "/assets/htmx"
SWAGGER_UI_URL = "/assets/swagger-ui"


def create_app(settings: Settings, *, assets_root: Path | None = None, sample_seconds: float = 1.0) -> FastAPI:
    assets = find_assets(assets_root)
    token, token_path = load_or_generate_token(settings.console_token_path)
    if token_path is not None:
        log.info("admin token generated and written to %s (mode 0600)", token_path)
    else:
        log.info("admin token taken from SIPWIRE_ADMIN_TOKEN")
    source = TransportSource(settings)
    history = History(source, sample_seconds)
    renderer = Renderer(assets.templates, {"htmx_path": f"{HTMX_URL}/htmx.min.js"})
    console = Console(
        settings=settings,
        assets=assets,
        source=source,
        history=history,
        auth=Auth(token),
        traces=TraceStore(
            settings.console_trace_spans, settings.console_trace_retention, settings.console_trace_slow_ms
        ),
        renderer=renderer,
        token_path=token_path,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        history.start()
        try:
            yield
        finally:
            history.stop()
            source.close()

    app = FastAPI(
        title="sipwire console",
        summary="Live state and administration of a sipwire transport.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own /docs and /redoc load their code and fonts from CDNs
        redoc_url=None,
    )
    app.state.console = console
    app.add_middleware(AccessGuard, auth=console.auth, policy=AccessPolicy.from_settings(settings))
    app.mount(HTMX_URL, StaticFiles(directory=assets.htmx_dist), name="htmx")
    app.mount(SWAGGER_UI_URL, StaticFiles(directory=assets.swagger_ui), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}{SWAGGER_UI_URL}/{SWAGGER_UI_JS}",
            swagger_css_url=f"{root}{SWAGGER_UI_URL}/{SWAGGER_UI_CSS}",
            swagger_favicon_url=f"{root}{SWAGGER_UI_URL}/{SWAGGER_UI_FAVICON}",
            # No "validator" badge: it would send the schema's URL to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    routers = [
        api.build_router(console),
        registrar.build_router(console),
        calls.build_router(console),
        build_router(console.traces, renderer, console.context),
        pages.build_router(console),
    ]
    for router in routers:
        app.include_router(router)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        """A 405 lists every method of the path (RFC 9110 15.5.6), not only the first route's that matched it."""
        if error.status_code == 405:
            path = request.url.path
            methods = {
                method
                for router in routers
                for route in router.routes
                if isinstance(route, Route) and route.methods and route.path_regex.match(path)
                for method in route.methods
            }
            if methods:
                error.headers = {**(error.headers or {}), "Allow": ", ".join(sorted(methods))}
        return await http_exception_handler(request, error)

    return app
