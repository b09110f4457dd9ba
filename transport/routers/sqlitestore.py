"""The registrar store on SQLite: one file in the runtime directory, shared by every worker.

Why SQLite: the unified worker pool means any worker may handle any
REGISTER or lookup, so bindings must be shared between processes; SQLite
in WAL mode gives that with readers that never block the writer, and no
server to run. Each worker opens one connection at start
(:func:`open_store`); ``registrar_wait_seconds`` bounds how long it waits
for another process's write, after which :class:`StoreBusyError` makes the
request fail with 500 and Retry-After instead of stalling the worker.

The file is created 0600 in the runtime directory (``sipwire/statedir.py``):
it holds HA1 values, which are password equivalents for their realm.
Writes use ``BEGIN IMMEDIATE`` so the read-check-write of a REGISTER
(:func:`~transport.routers.store.plan_register`) is one atomic step.

Durability: SQLite's default (``synchronous=FULL``) flushes the WAL to disk at
every commit, three per registration; that ``fdatasync`` was a third of the
worker's CPU per registration (docs/BENCHMARKS.md). The workers' connections write only
soft state (bindings, which phones refresh, and nonce counts, which expire
within ``digest_nonce_seconds``) and use ``synchronous=NORMAL``: a commit
survives a crash of the process, and only an OS crash or power loss can undo
the last ones (the WAL is flushed at each checkpoint). User changes
(``sipwire users``, the console) keep ``FULL``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from sipwire.config import Settings
from sipwire.errors import StoreError
from sipwire.statedir import runtime_directory
from sipwire.transport.routers.store import (
    Binding,
    RegisterRequest,
    RegisterStatus,
    User,
    UserError,
    UserInfo,
    normal_aor,
    plan_register,
)

#: The registrar's file in the runtime directory.
STORE_FILE: Final = "registrar.sqlite3"
#: Served domains are re-read this often: ``sipwire users add`` in another process shows up within it.
DOMAINS_CACHE_SECONDS: Final = 5.0
#: Schema version kept in ``PRAGMA user_version``: a file of another version is rebuilt (bindings are soft
#: state; users are kept when the ``users`` table is compatible).
SCHEMA_VERSION: Final = 2

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS users (aor TEXT PRIMARY KEY, realm TEXT NOT NULL, ha1_md5 TEXT NOT NULL,"
    " ha1_sha256 TEXT NOT NULL, created REAL NOT NULL)",
    "DROP TABLE IF EXISTS bindings",  # soft state: rebuilt on a schema change (executed only then)
    "CREATE TABLE IF NOT EXISTS bindings (aor TEXT NOT NULL, key TEXT NOT NULL, contact TEXT NOT NULL,"
    " instance TEXT NOT NULL, reg_id INTEGER NOT NULL, q TEXT NOT NULL, conn_id INTEGER NOT NULL,"
    " transport TEXT NOT NULL, local TEXT NOT NULL, remote TEXT NOT NULL, expires REAL NOT NULL,"
    " call_id TEXT NOT NULL, cseq INTEGER NOT NULL, user_agent TEXT NOT NULL, updated REAL NOT NULL,"
    " PRIMARY KEY (aor, key))",
    "CREATE INDEX IF NOT EXISTS bindings_conn ON bindings (conn_id)",
    "CREATE INDEX IF NOT EXISTS bindings_expires ON bindings (expires)",
    "CREATE TABLE IF NOT EXISTS nonce_counts (nonce TEXT PRIMARY KEY, nc INTEGER NOT NULL, until REAL NOT NULL)",
)
_BINDING_COLUMNS: Final = (
    "aor, key, contact, instance, reg_id, q, conn_id, transport, local, remote, expires, call_id, cseq,"
    " user_agent, updated"
)
_ORDER: Final = "ORDER BY aor, CAST(CASE q WHEN '' THEN '1' ELSE q END AS REAL) DESC, updated DESC"
#: One statement text, so sqlite3's statement cache finds it without building the string each time.
_BINDINGS_OF_AOR: Final = f"SELECT {_BINDING_COLUMNS} FROM bindings WHERE aor = ? AND expires > ? {_ORDER}"


class StoreBusyError(StoreError):
    """The registrar database stayed locked by another process longer than ``registrar_wait_seconds``."""


def store_path(settings: Settings) -> Path:
    """Where the instance's registrar file is (the runtime directory is created or checked)."""
    return runtime_directory(settings) / STORE_FILE


def open_store(settings: Settings, *, soft_state: bool = False) -> SqliteStore:
    """The instance's store, created 0600 on first use.

    ``soft_state``: this connection writes only bindings and nonce counts (a worker), so its commits are not
    flushed to disk one by one (``synchronous=NORMAL``; see :class:`SqliteStore`).
    """
    return SqliteStore(store_path(settings), settings.registrar_wait_seconds, soft_state=soft_state)


class SqliteStore:
    """:class:`~transport.routers.store.RegistrarStore` on one SQLite file; one object per process."""

    def __init__(self, path: Path, wait_seconds: float, *, soft_state: bool = False) -> None:
        self.path = path
        _create_private(path)
        try:
            self._db = sqlite3.connect(path, timeout=wait_seconds, isolation_level=None)
        except sqlite3.Error as error:
            raise StoreBusyError(f"cannot open the registrar database {path}: {error}") from error
        self._domains: frozenset[str] = frozenset()
        self._domains_read = -DOMAINS_CACHE_SECONDS
        with self._errors():
            self._db.execute("PRAGMA journal_mode=WAL")
            if soft_state:
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()

    def _migrate(self) -> None:
        """Create the tables, or rebuild the bindings of an older schema; a current file costs one read."""
        if self._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for statement in _SCHEMA:
                if statement.startswith("DROP") and version == SCHEMA_VERSION:
                    continue
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as error:
            raise self._busy(error) from error

    def _busy(self, error: sqlite3.OperationalError) -> StoreBusyError:
        return StoreBusyError(f"registrar database {self.path}: {error}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (``BEGIN IMMEDIATE``): no upgrade deadlock between workers."""
        with self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- users -------------------------------------------------------------------------------------

    def user(self, aor: str) -> User | None:
        with self._errors():
            row = self._db.execute("SELECT aor, ha1_md5, ha1_sha256 FROM users WHERE aor = ?", (aor,)).fetchone()
        return None if row is None else User(*row)

    def served_domains(self) -> frozenset[str]:
        now = time.monotonic()
        if now - self._domains_read >= DOMAINS_CACHE_SECONDS:
            with self._errors():
                rows = self._db.execute("SELECT DISTINCT realm FROM users").fetchall()
            self._domains = frozenset(row[0] for row in rows)
            self._domains_read = now
        return self._domains

    def users(self) -> list[UserInfo]:
        with self._errors():
            rows = self._db.execute("SELECT aor, realm, created FROM users ORDER BY aor").fetchall()
        return [UserInfo(*row) for row in rows]

    def add_user(self, user: User) -> None:
        aor = normal_aor(user.aor)
        with self._write() as db:
            if db.execute("SELECT 1 FROM users WHERE aor = ?", (aor,)).fetchone():
                raise UserError(f"user {aor} exists already (use passwd to change its password)")
            realm = aor.rpartition("@")[2]
            row = (aor, realm, user.ha1_md5, user.ha1_sha256, time.time())
            db.execute("INSERT INTO users VALUES (?, ?, ?, ?, ?)", row)
        self._domains_read = -DOMAINS_CACHE_SECONDS

    def replace_credentials(self, user: User) -> None:
        aor = normal_aor(user.aor)
        with self._write() as db:
            changed = db.execute(
                "UPDATE users SET ha1_md5 = ?, ha1_sha256 = ? WHERE aor = ?", (user.ha1_md5, user.ha1_sha256, aor)
            ).rowcount
            if not changed:
                raise UserError(f"no user {aor}")

    def remove_user(self, aor: str) -> None:
        aor = normal_aor(aor)
        with self._write() as db:
            if not db.execute("DELETE FROM users WHERE aor = ?", (aor,)).rowcount:
                raise UserError(f"no user {aor}")
            db.execute("DELETE FROM bindings WHERE aor = ?", (aor,))
        self._domains_read = -DOMAINS_CACHE_SECONDS

    # -- bindings ----------------------------------------------------------------------------------

    def bindings(self, aor: str, now: float) -> list[Binding]:
        try:  # read for every request the proxy routes: no context manager's generator here
            rows = self._db.execute(_BINDINGS_OF_AOR, (aor, now)).fetchall()
        except sqlite3.OperationalError as error:
            raise self._busy(error) from error
        return [Binding(*row) for row in rows]

    def register(self, request: RegisterRequest, max_contacts: int, now: float) -> RegisterStatus:
        with self._write() as db:
            rows = db.execute(
                f"SELECT {_BINDING_COLUMNS} FROM bindings WHERE aor = ? AND expires > ?", (request.aor, now)
            ).fetchall()
            existing = {binding.key: binding for binding in (Binding(*row) for row in rows)}
            plan = plan_register(existing, request, max_contacts, now)
            if not plan.status.ok:
                return plan.status
            db.execute("DELETE FROM bindings WHERE aor = ? AND expires <= ?", (request.aor, now))
            db.executemany("DELETE FROM bindings WHERE aor = ? AND key = ?", [(request.aor, k) for k in plan.delete])
            placeholders = ", ".join("?" * len(Binding._fields))
            db.executemany(f"INSERT OR REPLACE INTO bindings VALUES ({placeholders})", plan.write)
        return plan.status

    def connections_closed(self, conn_ids: Sequence[int]) -> int:
        if not conn_ids:
            return 0
        rows = [(conn_id,) for conn_id in conn_ids]
        with self._write() as db:
            before = db.total_changes
            db.executemany(
                "DELETE FROM bindings WHERE conn_id = ? AND (reg_id != 0 OR transport IN ('ws', 'wss'))", rows
            )
            removed = db.total_changes - before
            db.executemany("UPDATE bindings SET conn_id = 0 WHERE conn_id = ?", rows)
        return removed

    def purge(self, now: float) -> int:
        with self._write() as db:
            db.execute("DELETE FROM nonce_counts WHERE until <= ?", (now,))
            return int(db.execute("DELETE FROM bindings WHERE expires <= ?", (now,)).rowcount)

    def advance_nonce_count(self, nonce: str, count: int, until: float) -> bool:
        with self._write() as db:
            changed = db.execute(
                "INSERT INTO nonce_counts VALUES (?, ?, ?) ON CONFLICT (nonce) DO UPDATE SET nc = excluded.nc"
                " WHERE excluded.nc > nonce_counts.nc",
                (nonce, count, until),
            ).rowcount
        return bool(changed)

    def registrations(self, now: float) -> list[Binding]:
        with self._errors():
            rows = self._db.execute(f"SELECT {_BINDING_COLUMNS} FROM bindings WHERE expires > ? {_ORDER}", (now,))
            return [Binding(*row) for row in rows.fetchall()]

    def close(self) -> None:
        self._db.close()


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would use the umask); refuse a symlink."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise StoreBusyError(f"cannot create the registrar database {path}: {error.strerror}") from error
    os.fchmod(descriptor, 0o600)
    os.close(descriptor)
