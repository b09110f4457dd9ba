"""Jinja2 pages and their named blocks: one template per page, partials are its blocks.

As in jinja2-fragments, an htmx request gets one named block of the page
template rendered with the same context the full page uses, so the page and
its live parts can never drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


class Renderer:
    def __init__(self, templates: Path, globals_: Mapping[str, Any]) -> None:
        self.env = Environment(
            loader=FileSystemLoader(str(templates)),
            autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(globals_)
        self.env.filters["duration"] = format_duration
        self.env.filters["bytes"] = format_bytes
        self.env.filters["clock"] = format_clock

    def page(self, name: str, context: Mapping[str, Any], status_code: int = 200) -> HTMLResponse:
        html = self.env.get_template(name).render(context)
        return HTMLResponse(html, status_code=status_code)

    def block(self, name: str, block: str, context: Mapping[str, Any], status_code: int = 200) -> HTMLResponse:
        template = self.env.get_template(name)
        render = template.blocks.get(block)
        if render is None:
            raise KeyError(f"template {name} has no block {block!r}")
        html = "".join(render(template.new_context(dict(context))))
        return HTMLResponse(html, status_code=status_code)


def format_duration(seconds: float | None) -> str:
    """A short human duration: 45s, 12m 3s, 5h 2m, 3d 4h."""
    if seconds is None:
        return "-"
    total = int(seconds)
    if total < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def format_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_clock(wall: float | None) -> str:
    if not wall:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(wall))
