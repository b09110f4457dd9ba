"""The registrar's store: users (HA1 only) and bindings, behind one small interface.

:class:`RegistrarStore` is what the ``proxy`` router, the ``sipwire users``
command and the console use; ``transport/routers/sqlitestore.py`` implements
it on SQLite (the default: one file in the runtime directory, shared by every
worker). A PostgreSQL store for several sipwire hosts would implement the same
Protocol; nothing else would change.

The rules of RFC 3261 section 10.3 steps 6-8 that decide what one REGISTER
does to the existing bindings (:func:`plan_register`) live here, apart from
any backend, so every store applies them the same way inside its own
transaction.

Binding keys: a contact with ``+sip.instance`` and ``reg-id`` is an RFC 5626
*flow* (``flow <instance> <reg-id>``): a new REGISTER of the same flow
replaces it, whatever its Contact URI (a phone that reconnects gets a new
ephemeral port). One with only ``+sip.instance`` is keyed by the instance;
anything else by its Contact URI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol

from sipwire.errors import StoreError

#: A user is ``USER@DOMAIN``: both parts non-empty, no spaces, no second ``@``.
MAX_AOR_CHARS: Final = 256


class UserError(StoreError):
    """A user change was refused: no such user, already exists, or not ``USER@DOMAIN``."""


class User(NamedTuple):
    """One user's credentials as stored: HA1 values only, never the password."""

    aor: str  # "alice@sip.test"; the realm is its domain
    ha1_md5: str
    ha1_sha256: str


class UserInfo(NamedTuple):
    """What may be shown of a user (no HA1)."""

    aor: str
    realm: str
    created: float


class Binding(NamedTuple):
    """One registered contact of an address-of-record, and the flow that reaches it."""

    aor: str
    key: str  # see the module docstring
    contact: str  # the Contact URI
    instance: str  # +sip.instance, quotes included ("" without)
    reg_id: int  # 0 without
    q: str  # the q parameter as sent ("" without)
    conn_id: int  # the connection it registered over, requests for it leave there (0: closed, use the Contact)
    transport: str  # tcp, tls, ws or wss
    local: str  # HOST:PORT of ours the phone connected to (its Record-Route address)
    remote: str  # HOST:PORT the REGISTER came from
    expires: float  # UNIX time
    call_id: str
    cseq: int
    user_agent: str
    updated: float  # UNIX time of the REGISTER that last refreshed it

    @property
    def priority(self) -> float:
        """q as a number (1.0 when absent): the highest is chosen (no forking, docs/ROUTERS.md)."""
        try:
            return float(self.q) if self.q else 1.0
        except ValueError:
            return 1.0


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """What one REGISTER asks, already parsed and bounded by the registrar (``registrar.py``)."""

    aor: str
    call_id: str
    cseq: int
    wildcard: bool  # Contact: * with Expires: 0
    bindings: Sequence[Binding] = field(default_factory=tuple)  # expires == 0: remove that key


class RegisterStatus(NamedTuple):
    """What a REGISTER did: ``ok``, else why it was refused (nothing changed)."""

    ok: bool
    reason: str = ""  # "out_of_order" or "too_many_contacts"
    added: int = 0
    removed: int = 0


class Plan(NamedTuple):
    """The changes :func:`plan_register` decided: keys to delete, bindings to write."""

    status: RegisterStatus
    delete: list[str]
    write: list[Binding]


def plan_register(existing: dict[str, Binding], request: RegisterRequest, max_contacts: int, now: float) -> Plan:
    """RFC 3261 section 10.3 steps 6-8 over the AOR's current bindings (expired ones are not in ``existing``).

    A binding refreshed by a request of the same Call-ID must come with a
    higher CSeq (else the whole request fails, "out of order"); a removal
    (expires 0) of an unknown key is no error. The result may hold at most
    ``max_contacts`` bindings.
    """
    targets = list(existing) if request.wildcard else [binding.key for binding in request.bindings]
    for key in targets:
        old = existing.get(key)
        if old is not None and old.call_id == request.call_id and request.cseq <= old.cseq:
            return Plan(RegisterStatus(False, "out_of_order"), [], [])
    if request.wildcard:
        return Plan(RegisterStatus(True, removed=len(existing)), list(existing), [])
    delete: list[str] = []
    write: list[Binding] = []
    kept = dict(existing)
    for binding in request.bindings:
        if binding.expires <= now:
            if kept.pop(binding.key, None) is not None:
                delete.append(binding.key)
        else:
            kept[binding.key] = binding
            write.append(binding)
    if len(kept) > max_contacts:
        return Plan(RegisterStatus(False, "too_many_contacts"), [], [])
    added = sum(1 for binding in write if binding.key not in existing)
    return Plan(RegisterStatus(True, added=added, removed=len(delete)), delete, write)


def split_aor(aor: str) -> tuple[str, str]:
    """``USER@DOMAIN`` -> (user, domain lower-cased); :class:`UserError` when it is not one."""
    user, at, domain = aor.strip().rpartition("@")
    if (
        not at
        or not user
        or not domain
        or len(aor) > MAX_AOR_CHARS
        or any(char.isspace() or char in "@<>\";:,'" for char in user + domain)
        or not aor.isascii()
    ):
        raise UserError(f"{aor[:80]!r} is not USER@DOMAIN (ASCII, no spaces, quotes, brackets, ';', ':' or ',')")
    return user, domain.lower()


def normal_aor(aor: str) -> str:
    """The stored spelling of an AOR: the user as written, the domain lower-cased."""
    user, domain = split_aor(aor)
    return f"{user}@{domain}"


class RegistrarStore(Protocol):
    """Users and bindings; every method is one short transaction, safe to call from any worker."""

    def user(self, aor: str) -> User | None:
        """The user ``aor`` (``alice@sip.test``), or None."""
        ...

    def served_domains(self) -> frozenset[str]:
        """Domains of the configured users (lower-case): the realms this registrar authenticates."""
        ...

    def users(self) -> list[UserInfo]:
        """Every user, without secrets, by AOR."""
        ...

    def add_user(self, user: User) -> None:
        """Create a user; :class:`UserError` if it exists."""
        ...

    def replace_credentials(self, user: User) -> None:
        """Set a user's HA1 values (new password); :class:`UserError` if it does not exist."""
        ...

    def remove_user(self, aor: str) -> None:
        """Delete a user and its bindings; :class:`UserError` if it does not exist."""
        ...

    def bindings(self, aor: str, now: float) -> list[Binding]:
        """The AOR's unexpired bindings, best first (highest q, then the most recently refreshed)."""
        ...

    def register(self, request: RegisterRequest, max_contacts: int, now: float) -> RegisterStatus:
        """Apply one REGISTER atomically (:func:`plan_register`)."""
        ...

    def connections_closed(self, conn_ids: Sequence[int]) -> int:
        """These connections closed: their RFC 5626 flows and WebSocket bindings go (how many is returned: nothing
        can reach a WebSocket client but its own connection); other bindings made over them keep their Contact,
        now reached by its address (RFC 3261), with connection id 0."""
        ...

    def purge(self, now: float) -> int:
        """Remove expired bindings and nonce counts; how many bindings went."""
        ...

    def advance_nonce_count(self, nonce: str, count: int, until: float) -> bool:
        """Record ``count`` (a digest nc) for ``nonce``; False when it is not above the last one (a replay)."""
        ...

    def registrations(self, now: float) -> list[Binding]:
        """Every unexpired binding, by AOR then best first (the console's list)."""
        ...

    def close(self) -> None: ...
