"""``sipwire users``: the proxy's users, kept in the registrar database as HA1 values only.

``add USER@DOMAIN`` and ``passwd USER@DOMAIN`` take the password from
``--password``, else from the first line of standard input when it is not
a terminal (scripts: ``echo secret | sipwire users add alice@sip.test``),
else from a prompt asked twice. The password is hashed at once into the
MD5 and SHA-256 HA1 values (realm: the user's domain) and never stored,
printed or logged. ``list`` shows users without any secret. The database
is the running instance's (``--instance``, ``--state-dir``): a change is
seen by every worker at its next request.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Final

from sipwire.config import Settings
from sipwire.errors import StoreError
from sipwire.transport.routers.digest import credentials_for
from sipwire.transport.routers.sqlitestore import open_store
from sipwire.transport.routers.store import split_aor

#: A password shorter than this is refused: digest HA1 values can be brute-forced offline.
MIN_PASSWORD_CHARS: Final = 8
#: The most of a password line read from standard input.
MAX_PASSWORD_CHARS: Final = 1024


class PasswordError(StoreError):
    """The password given to ``sipwire users`` is refused (too short, or the two prompts differ)."""


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    text = "manage the proxy router's users (digest credentials stored as HA1 only)"
    users = commands.add_parser("users", help=text, description=text)
    actions = users.add_subparsers(dest="action", required=True)
    for name, text in (("add", "add a user"), ("passwd", "set a user's password")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("aor", metavar="USER@DOMAIN", help="the user; its domain is the digest realm")
        action.add_argument("--password", help="the password (else read from stdin, else prompted)")
    actions.add_parser("list", help="list users (no secrets)", description="list users (no secrets)")
    remove = actions.add_parser("remove", help="remove a user and its bindings", description="remove a user")
    remove.add_argument("aor", metavar="USER@DOMAIN", help="the user to remove")
    return users


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one ``sipwire users`` action; the exit status (1 with a message on stderr when refused)."""
    try:
        return _run(settings, args)
    except StoreError as error:
        print(f"sipwire users: {error}", file=sys.stderr)
        return 1


def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.action in ("add", "passwd"):
        split_aor(args.aor)  # a bad name fails before any password is asked
        user = credentials_for(args.aor, _password(args.password))
    store = open_store(settings)
    try:
        if args.action == "list":
            for info in store.users():
                print(f"{info.aor}  realm {info.realm}")
        elif args.action == "add":
            store.add_user(user)
            print(f"user {user.aor} added")
        elif args.action == "passwd":
            store.replace_credentials(user)
            print(f"password of {user.aor} changed")
        else:
            store.remove_user(args.aor)
            print(f"user {args.aor} removed")
    finally:
        store.close()
    return 0


def _password(given: str | None) -> str:
    if given is None and not sys.stdin.isatty():
        given = sys.stdin.readline(MAX_PASSWORD_CHARS).rstrip("\r\n")
    elif given is None:
        given = getpass.getpass("password: ")
        if getpass.getpass("again: ") != given:
            raise PasswordError("the two passwords differ")
    if len(given) < MIN_PASSWORD_CHARS:
        raise PasswordError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    return given
