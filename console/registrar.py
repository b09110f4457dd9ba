"""The proxy's registrar in the console: the Registrations page, ``GET /api/registrations``, users (admin).

The console reads the registrar's store directly (the SQLite file in the
instance's runtime directory, :mod:`transport.routers.sqlitestore`), not
through the transport: bindings are kept there by the workers, and reading
them costs the transport nothing. A store is opened per request (a SQLite
connection belongs to one thread, and FastAPI runs these handlers on a pool).

Users: ``GET /api/users`` lists them without secrets; ``PUT
/api/users/{aor}`` with ``{"password": ...}`` creates the user or sets its
password (hashed at once to HA1 values); ``DELETE /api/users/{aor}``
removes it and its bindings. All three need the admin token, like every change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import APIRouter, Body, Path, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from sipwire.console import views
from sipwire.console.models import Problem, Registration, RegistrationList, UserList, UserPassword
from sipwire.console.render import is_htmx
from sipwire.errors import StoreError
from sipwire.transport.routers.digest import credentials_for
from sipwire.transport.routers.sqlitestore import SqliteStore, open_store
from sipwire.transport.routers.store import Binding, UserError

if TYPE_CHECKING:
    from sipwire.console.state import Console

#: What ``{aor}`` in a users path may be: the characters ``sipwire users`` accepts in USER@DOMAIN, at most
#: 256 of them (path-safe: no '/', '%', '?', '#').
AOR_PATTERN: Final = r"^[A-Za-z0-9_.!~*()&=+$-]{1,128}@[A-Za-z0-9.-]{1,127}$"

ADMIN: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "admin token missing or wrong"},
    503: {"model": Problem, "description": "the registrar database cannot be read now"},
}


def _problem(status: int, detail: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="sipwire"'} if status == 401 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def registrations(store: SqliteStore, now: float) -> list[dict[str, Any]]:
    """Every AOR with its contacts, as ``GET /api/registrations`` answers them."""
    by_aor: dict[str, list[dict[str, Any]]] = {}
    for binding in store.registrations(now):
        by_aor.setdefault(binding.aor, []).append(_contact(binding, now))
    return [{"aor": aor, "contacts": contacts} for aor, contacts in by_aor.items()]


def _contact(binding: Binding, now: float) -> dict[str, Any]:
    return {
        "contact": binding.contact,
        "expires": max(0, int(binding.expires - now)),
        "q": binding.priority if binding.q else None,
        "instance": binding.instance.strip('"') or None,
        "reg_id": binding.reg_id or None,
        "flow": "outbound" if binding.reg_id else "connection",
        "connection": binding.conn_id,
        "transport": binding.transport,
        "local": binding.local,
        "remote": binding.remote,
        "user_agent": binding.user_agent,
        "last_seen": binding.updated,
    }


def build_router(console: Console) -> APIRouter:
    router = APIRouter()
    settings, auth, renderer = console.settings, console.auth, console.renderer

    @contextmanager
    def store() -> Iterator[SqliteStore]:
        opened = open_store(settings)
        try:
            yield opened
        finally:
            opened.close()

    def read_registrations() -> tuple[list[dict[str, Any]], str]:
        try:
            with store() as opened:
                return registrations(opened, time.time()), ""
        except StoreError as error:
            return [], str(error)

    @router.get(
        "/api/registrations",
        response_model=RegistrationList,
        responses={503: ADMIN[503]},
        tags=["registrar"],
        summary="Registered contacts per address-of-record",
    )
    def get_registrations(request: Request) -> Any:
        found, error = read_registrations()
        if is_htmx(request):
            context = views.status_context(console.source, console.history) | {"registrations": found, "error": error}
            return renderer.block("registrations.html", "table", console.context(request, **context))
        if error:
            return _problem(503, error)
        return RegistrationList(registrations=[Registration.model_validate(item) for item in found])

    @router.get("/registrations", include_in_schema=False)
    def registrations_page(request: Request) -> Response:
        found, error = read_registrations()
        users: list[Any] = []
        if auth.admin_reason(request) is None:
            try:
                with store() as opened:
                    users = opened.users()
            except StoreError as failure:
                error = error or str(failure)
        context = views.status_context(console.source, console.history) | {
            "registrations": found, "error": error, "users": users,
        }  # fmt: skip
        return renderer.page("registrations.html", console.context(request, page="registrations", **context))

    @router.get("/api/users", response_model=UserList, responses=ADMIN, tags=["registrar"], summary="Users (admin)")
    async def list_users(request: Request) -> Any:
        reason = auth.admin_reason(request)
        if reason is not None:
            return _problem(401, reason)

        def read() -> list[dict[str, Any]]:
            with store() as opened:
                return [info._asdict() for info in opened.users()]

        try:
            return UserList.model_validate({"users": await run_in_threadpool(read)})
        except StoreError as error:
            return _problem(503, str(error))

    @router.put(
        "/api/users/{aor}",
        response_model=UserList,
        responses={**ADMIN, 400: {"model": Problem, "description": "the body is not JSON"}},
        tags=["registrar"],
        summary="Create a user, or set its password (admin); answers the user list",
    )
    async def put_user(
        request: Request,
        aor: Annotated[str, Path(pattern=AOR_PATTERN, max_length=256, description="USER@DOMAIN")],
        body: Annotated[UserPassword, Body()],
    ) -> Any:
        reason = auth.admin_reason(request)
        if reason is not None:
            return _problem(401, reason)

        def write() -> list[dict[str, Any]]:
            user = credentials_for(aor, body.password)
            with store() as opened:
                if opened.user(user.aor) is None:
                    opened.add_user(user)
                else:
                    opened.replace_credentials(user)
                return [info._asdict() for info in opened.users()]

        try:
            return UserList.model_validate({"users": await run_in_threadpool(write)})
        except UserError as error:
            return _problem(422, str(error))
        except StoreError as error:
            return _problem(503, str(error))

    @router.delete(
        "/api/users/{aor}",
        response_model=UserList,
        responses={**ADMIN, 404: {"model": Problem, "description": "no such user"}},
        tags=["registrar"],
        summary="Remove a user and its bindings (admin); answers the user list",
    )
    async def delete_user(
        request: Request, aor: Annotated[str, Path(pattern=AOR_PATTERN, max_length=256, description="USER@DOMAIN")]
    ) -> Any:
        reason = auth.admin_reason(request)
        if reason is not None:
            return _problem(401, reason)

        def remove() -> list[dict[str, Any]]:
            with store() as opened:
                opened.remove_user(aor)
                return [info._asdict() for info in opened.users()]

        try:
            return UserList.model_validate({"users": await run_in_threadpool(remove)})
        except UserError as error:
            return _problem(404, str(error))
        except StoreError as error:
            return _problem(503, str(error))

    return router
