"""Who may reach the console at all: a Host allow-list, reads behind the token off loopback, the OTLP receiver.

One ASGI middleware in front of every route, so no route can forget it:

* **Host allow-list** (``console_allowed_hosts``). A request whose ``Host``
  is not on the list gets ``400``. This defeats DNS rebinding: a web page
  on ``evil.example`` that re-points its name at 127.0.0.1 still sends
  ``Host: evil.example``, so it cannot read the console from the
  operator's browser. By default the list holds the loopback names and
  addresses and the console's own listen address.
* **Reads.** On loopback every page and GET endpoint is open, as ``sipwire
  ctl`` is to local users. When the console listens on any other address,
  every request needs the admin token (``Authorization: Bearer``) or a
  login session, except ``console_public_paths`` (``/api/health`` and
  ``/metrics`` by default), the login form and the static assets: API
  clients get ``401``, browsers are sent to the login form.
* **OTLP receiver** (``POST /v1/traces``): senders on loopback, or with the
  token; anyone else gets ``401``, so no one can fill the trace store.

Changes (PUT, POST, DELETE) are checked by the routes themselves
(:meth:`console.auth.Auth.admin_reason`: token, or session plus CSRF).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from starlette.requests import Request

from sipwire.config import Settings
from sipwire.console.auth import Auth

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
#: Always reachable, so that a browser can log in and render the login form.
ALWAYS_OPEN: Final = ("/login", "/assets/")
OTLP_PATH: Final = "/v1/traces"


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    allowed_hosts: frozenset[str]  # lower-case host names and addresses; empty: any host
    reads_need_token: bool
    public_paths: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        listen_host = settings.console_address[0]
        configured = [h.strip().lower() for h in settings.console_allowed_hosts.split(",") if h.strip()]
        if "*" in configured:
            hosts: frozenset[str] = frozenset()
        elif configured:
            hosts = frozenset(configured)
        else:
            hosts = LOOPBACK_NAMES | ({listen_host} if not _wildcard(listen_host) else set())
        public = frozenset(p.strip() for p in settings.console_public_paths.split(",") if p.strip())
        return cls(hosts, not _loopback(listen_host), public)


def _loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def host_of(header: str) -> str:
    """``example.test:8080`` -> ``example.test``; ``[::1]:8080`` -> ``::1``; lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class AccessGuard:
    """The middleware; see the module docstring."""

    def __init__(self, app: ASGIApp, auth: Auth, policy: AccessPolicy) -> None:
        self.app = app
        self.auth = auth
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, detail, location = refusal
        headers = [(b"content-type", b"application/json")]
        if location:
            headers.append((b"location", location.encode()))
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _refusal(self, request: Request) -> tuple[int, str, str] | None:
        """(status, reason, redirect) when the request may not go on, else None."""
        policy = self.policy
        host = host_of(request.headers.get("host", ""))
        if policy.allowed_hosts and host not in policy.allowed_hosts:
            return 400, f"host {host[:80]!r} is not allowed here; add it to console_allowed_hosts", ""
        path = request.url.path
        if path == OTLP_PATH:
            client = request.client.host if request.client is not None else ""
            if _loopback_client(client) or self.auth.bearer_ok(request):
                return None
            return 401, "traces are accepted from loopback senders, or with the admin token", ""
        if not policy.reads_need_token or path in policy.public_paths or path.startswith(ALWAYS_OPEN):
            return None
        if self.auth.bearer_ok(request) or self.auth.session(request) is not None:
            return None
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            return 303, "log in first", f"/login?next={quote(path, safe='/')}"
        return 401, "this console listens beyond loopback: send Authorization: Bearer <token>, or log in", ""


def _loopback_client(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
