"""Who may change the transport: the admin token, browser sessions and CSRF checks.

* **The token.** ``SIPWIRE_ADMIN_TOKEN`` if set; otherwise a fresh random
  token is generated at every start and written to a file created with
  mode 0600 (``console_token_file``), whose *path* is logged. The token
  itself is never logged, rendered or put in a cookie.
* **API clients** send ``Authorization: Bearer <token>``. Browsers never
  add that header by themselves, so bearer requests need no CSRF check.
* **Browsers** log in with a form; the console answers with a cookie
  holding a random session id (``HttpOnly``: scripts cannot read it;
  ``SameSite=Strict``: other sites cannot make the browser send it).
  Sessions live in memory, bounded by :data:`MAX_SESSIONS` and
  :data:`SESSION_SECONDS`, and end when the console restarts.
* **CSRF.** A request authenticated by the cookie must also carry the
  session's CSRF token (header ``X-CSRF-Token``, which htmx adds from the
  page, or form field ``csrf``) and, when the browser sends one, an
  ``Origin`` equal to the console's own. SameSite alone would stop
  cross-site requests in current browsers; the token also covers
  same-site siblings and old browsers.

Reading (pages, GET endpoints) needs no token while the console listens on
loopback, its default: the figures are what ``sipwire ctl`` shows anyone
who can reach the control socket. Beyond loopback, :mod:`console.guard`
puts every read behind the token too.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from starlette.requests import Request

from sipwire.errors import ConfigurationError
from sipwire.statedir import private_directory, write_private

log = logging.getLogger("sipwire.console")

SESSION_COOKIE: Final = "sipwire_session"
CSRF_HEADER: Final = "X-CSRF-Token"
CSRF_FIELD: Final = "csrf"
TOKEN_ENV: Final = "SIPWIRE_ADMIN_TOKEN"
#: Browser sessions kept at once; the oldest is dropped first (a login costs the attacker a valid token anyway).
MAX_SESSIONS: Final = 1000
#: A session lasts a working day; then the operator logs in again.
SESSION_SECONDS: Final = 12 * 3600.0
#: Generated tokens: 32 random bytes, URL-safe.
TOKEN_BYTES: Final = 32
#: A token shorter than this from the environment is refused at start: it could be guessed.
MIN_TOKEN_CHARS: Final = 16

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


class AuthSetupError(ConfigurationError):
    """The admin token cannot be set up (token file not writable, token too short)."""


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    csrf: str
    created: float


def load_or_generate_token(token_path: Path) -> tuple[str, Path | None]:
    """The admin token and the file it was written to (None when it came from the environment)."""
    from_env = os.environ.get(TOKEN_ENV)
    if from_env is not None:
        if len(from_env.strip()) < MIN_TOKEN_CHARS:
            raise AuthSetupError(
                f"{TOKEN_ENV} is set but shorter than {MIN_TOKEN_CHARS} characters; use a long random value"
            )
        return from_env.strip(), None
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        private_directory(token_path.parent)
        write_private(token_path, token.encode() + b"\n")
    except OSError as error:
        raise AuthSetupError(
            f"cannot write the admin token file {token_path}: {error.strerror}; set console_token_file or {TOKEN_ENV}"
        ) from error
    return token, token_path


class Auth:
    """Checks requests against the admin token and the browser sessions it opened."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def token_matches(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.strip().encode(), self._token)

    # -- sessions ---------------------------------------------------------------------------------

    def open_session(self) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time())
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session

    def end_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def session(self, request: Request) -> Session | None:
        session_id = request.cookies.get(SESSION_COOKIE)
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and time.time() - session.created > SESSION_SECONDS:
                del self._sessions[session_id]
                return None
        return session

    # -- checks -----------------------------------------------------------------------------------

    def bearer_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and bool(value) and self.token_matches(value)

    def admin_reason(self, request: Request, form_csrf: str | None = None) -> str | None:
        """None when the request may change things, else a sentence saying what is missing."""
        if self.bearer_ok(request):
            return None
        if request.headers.get("authorization"):
            return "the bearer token is not the admin token"
        session = self.session(request)
        if session is None:
            return "an admin token is required: send Authorization: Bearer <token>, or log in"
        if request.method in SAFE_METHODS:
            return None
        if not same_origin(request):
            return "the request comes from another origin"
        sent = request.headers.get(CSRF_HEADER) or form_csrf or ""
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            return "the CSRF token is missing or wrong; reload the page"
        return None


def same_origin(request: Request) -> bool:
    """True when the browser sent no Origin, or one naming this console's own scheme, host and port."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")
