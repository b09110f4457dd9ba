"""The application factory: one :class:`Console` holds every part; routes get it explicitly.

``create_app(settings)`` finds the templates and htmx, sets up the admin
token, the data source, the sampler and the trace store, and mounts:

* ``/api/...`` and ``/metrics`` (:mod:`console.api`),
* the pages and the login form (:mod:`console.pages`),
* ``/v1/traces`` (:mod:`console.otlp`),
* ``/assets/htmx/`` -- the ``htmx.org`` npm package's ``dist`` folder.

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
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from sipwire.config import Settings
from sipwire.console import api, pages
from sipwire.console.assets import find_assets
from sipwire.console.auth import Auth, load_or_generate_token
from sipwire.console.history import History
from sipwire.console.otlp import TraceStore, build_router
from sipwire.console.render import Renderer
from sipwire.console.source import TransportSource
from sipwire.console.state import Console

log = logging.getLogger("sipwire.console")


def create_app(settings: Settings, *, assets_root: Path | None = None, sample_seconds: float = 1.0) -> FastAPI:
    assets = find_assets(assets_root)
    token, token_path = load_or_generate_token(settings.console_token_path)
    if token_path is not None:
        log.info("admin token generated and written to %s (mode 0600)", token_path)
    else:
        log.info("admin token taken from SIPWIRE_ADMIN_TOKEN")
    source = TransportSource(settings)
    history = History(source, sample_seconds)
    renderer = Renderer(assets.templates, {"htmx_path": "/assets/htmx/htmx.min.js"})
    console = Console(
        settings=settings,
        assets=assets,
        source=source,
        history=history,
        auth=Auth(token),
        traces=TraceStore(settings.console_trace_capacity),
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
    )
    app.state.console = console
    app.mount("/assets/htmx", StaticFiles(directory=assets.htmx_dist), name="htmx")
    routers = [api.build_router(console), build_router(console.traces, renderer, console.context)]
    routers.append(pages.build_router(console))
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
