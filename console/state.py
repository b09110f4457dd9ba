"""The state every console route works with: one :class:`Console` per app, passed explicitly.

It lives apart from the app factory so that route modules can name its
type without importing the factory that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request

from sipwire.config import Settings
from sipwire.console.assets import Assets
from sipwire.console.auth import Auth
from sipwire.console.history import History
from sipwire.console.render import Renderer
from sipwire.console.source import TransportSource
from sipwire.console.tracestore import TraceStore


@dataclass
class Console:
    """Everything the routes use; one per app, no module-level state."""

    settings: Settings
    assets: Assets
    source: TransportSource
    history: History
    auth: Auth
    traces: TraceStore
    renderer: Renderer
    token_path: Path | None

    def context(self, request: Request, **values: Any) -> dict[str, Any]:
        """What every template gets: login state, the CSRF token of the session, the current path."""
        session = self.auth.session(request)
        return {
            "logged_in": session is not None,
            "csrf": session.csrf if session is not None else "",
            "path": request.url.path,
            "jaeger_url": self.settings.console_jaeger_url.rstrip("/"),
            "instance": self.settings.instance,
            **values,
        }
