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

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from sipwire.config import Settings
from sipwire.console import api, pages
from sipwire.console.assets import find_assets
from sipwire.console.auth import Auth, load_or_generate_token
from sipwire.console.guard import AccessGuard, AccessPolicy
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
    app.add_middleware(AccessGuard, auth=console.auth, policy=AccessPolicy.from_settings(settings))
    app.mount("/assets/htmx", StaticFiles(directory=assets.htmx_dist), name="htmx")
    app.include_router(api.build_router(console))
    app.include_router(build_router(console.traces, renderer, console.context))
    app.include_router(pages.build_router(console))
    return app
