"""Digest authentication (RFC 3261 section 22, RFC 8760) that any worker can check on its own.

Challenges offer every algorithm of ``digest_algorithms`` (SHA-256 first, as
RFC 8760 asks, then MD5 for older phones), each with ``qop="auth"``; a
response without qop is refused, because only qop gives the nonce count
that stops replays.

Nonces are stateless: ``<time><random><HMAC>`` in hex, the HMAC-SHA256 under
an instance secret (0600 in the runtime directory) over the time and the
random part. Any worker, in any process, checks one without asking the
others: a nonce whose HMAC is wrong was not made here; one older than
``digest_nonce_seconds`` is *stale*, answered with a fresh challenge and
``stale=true`` so the phone retries without asking its user. The nonce
count (``nc``) of each nonce must grow; the last one is kept in the store
(:meth:`~transport.routers.store.RegistrarStore.advance_nonce_count`),
shared by every worker, until the nonce expires.

Users are stored as HA1 values only, ``H(user:realm:password)`` for MD5 and
SHA-256; the realm is the user's domain.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from sipwire.transport.routers.store import RegistrarStore, User, split_aor
from sipwire.transport.sip import SipMessage


class _Digest(Protocol):
    def hexdigest(self) -> str: ...


#: The hash of each digest algorithm (RFC 8760 names).
HASHES: Final[dict[str, Callable[[bytes], _Digest]]] = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}
#: The instance secret that signs nonces, in the runtime directory.
NONCE_KEY_FILE: Final = "digest-nonce.key"
#: Hex digits of each nonce part: a 32-bit time, 64 random bits, a 128-bit HMAC.
_TIME_DIGITS, _RANDOM_DIGITS, _MAC_DIGITS = 8, 16, 32
NONCE_DIGITS: Final = _TIME_DIGITS + _RANDOM_DIGITS + _MAC_DIGITS
#: A nonce dated this far in the future (clock steps between hosts sharing a key) is still accepted.
CLOCK_SKEW_SECONDS: Final = 60.0
#: A credentials header longer than this is not parsed (a real one is a few hundred bytes).
MAX_CREDENTIALS_CHARS: Final = 4096
#: Nonce counts are 8 hex digits (RFC 7616 section 3.4), from 1.
NONCE_COUNT_DIGITS: Final = 8


def hash_hex(algorithm: str, text: str) -> str:
    return HASHES[algorithm](text.encode("utf-8", "surrogatepass")).hexdigest()


def credentials_for(aor: str, password: str) -> User:
    """A user's HA1 values for both algorithms: the password itself is never stored."""
    user, domain = split_aor(aor)
    secret = f"{user}:{domain}:{password}"
    return User(f"{user}@{domain}", hash_hex("MD5", secret), hash_hex("SHA-256", secret))


class Nonces:
    """Makes and checks stateless nonces (see the module docstring)."""

    def __init__(self, key: bytes, lifetime: float) -> None:
        self._key = key
        self.lifetime = lifetime

    def _mac(self, stamp_and_random: str) -> str:
        digest = hmac.new(self._key, f"nonce|{stamp_and_random}".encode(), hashlib.sha256).hexdigest()
        return digest[:_MAC_DIGITS]

    def new(self, now: float) -> str:
        body = f"{int(now) & 0xFFFFFFFF:08x}{secrets.token_hex(_RANDOM_DIGITS // 2)}"
        return body + self._mac(body)

    def check(self, nonce: str, now: float) -> str:
        """``valid``, ``stale`` (ours, too old) or ``invalid`` (not made with this key)."""
        if len(nonce) != NONCE_DIGITS or not nonce.isascii():  # compare_digest raises on other text
            return "invalid"
        body, mac = nonce[: _TIME_DIGITS + _RANDOM_DIGITS], nonce[_TIME_DIGITS + _RANDOM_DIGITS :]
        if not hmac.compare_digest(mac, self._mac(body)):
            return "invalid"
        age = now - int(body[:_TIME_DIGITS], 16)
        return "valid" if -CLOCK_SKEW_SECONDS <= age <= self.lifetime else "stale"

    def until(self, nonce: str) -> float:
        """When a (valid) nonce stops being accepted: its nonce count may be forgotten then."""
        return int(nonce[:_TIME_DIGITS], 16) + self.lifetime + CLOCK_SKEW_SECONDS


@dataclass(frozen=True, slots=True)
class Credentials:
    """The parameters of one ``Digest`` Authorization or Proxy-Authorization value."""

    params: dict[str, str]

    def get(self, name: str) -> str:
        return self.params.get(name, "")


def parse_credentials(value: str) -> Credentials | None:
    """``Digest username="a", realm="b", ...`` -> its parameters (unquoted, names lower-cased); None if not Digest."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest" or len(value) > MAX_CREDENTIALS_CHARS:
        return None
    params: dict[str, str] = {}
    i, length = 0, len(rest)
    while i < length:
        while i < length and rest[i] in " \t,":
            i += 1
        equals = rest.find("=", i)
        if equals < 0:
            break
        name = rest[i:equals].strip().lower()
        i = equals + 1
        while i < length and rest[i] in " \t":
            i += 1
        if i < length and rest[i] == '"':
            end = i + 1
            chars: list[str] = []
            while end < length and rest[end] != '"':
                if rest[end] == "\\" and end + 1 < length:
                    end += 1
                chars.append(rest[end])
                end += 1
            params[name] = "".join(chars)
            i = end + 1
        else:
            end = rest.find(",", i)
            end = length if end < 0 else end
            params[name] = rest[i:end].strip()
            i = end
    return Credentials(params)


class Verdict(NamedTuple):
    """The result of checking a request's credentials.

    ``action``: ``ok``; ``challenge`` (answer 401/407 with a fresh nonce,
    ``stale`` says whether to flag it); ``refuse`` (403). ``reason`` is the
    counter suffix of a failure (``auth_failed.<reason>``), "" when none.
    """

    action: str
    reason: str = ""
    stale: bool = False
    aor: str = ""


class DigestAuth:
    """Challenges and checks for one worker; see the module docstring."""

    def __init__(self, store: RegistrarStore, nonces: Nonces, algorithms: tuple[str, ...]) -> None:
        self._store = store
        self._nonces = nonces
        self._algorithms = algorithms

    def challenges(self, realm: str, now: float, *, stale: bool = False) -> list[str]:
        """One challenge value per offered algorithm, in order, sharing one nonce."""
        nonce = self._nonces.new(now)
        flag = ", stale=true" if stale else ""
        return [
            f'Digest realm="{realm}", nonce="{nonce}", algorithm={algorithm}, qop="auth"{flag}'
            for algorithm in self._algorithms
        ]

    def verify(self, message: SipMessage, header: str, realm: str, identity: str, now: float) -> Verdict:
        """Check the credentials for ``realm`` in ``header`` (``authorization`` or ``proxy-authorization``).

        ``identity`` is the AOR the request speaks for (To of a REGISTER, From
        otherwise): the credentials must be that user's.
        """
        credentials = None
        for value in message.header_lines(header):
            parsed = parse_credentials(value)
            if parsed is not None and parsed.get("realm").lower() == realm:
                credentials = parsed
                break
        if credentials is None:
            return Verdict("challenge")
        nonce = credentials.get("nonce")
        state = self._nonces.check(nonce, now)
        if state != "valid":
            return Verdict("challenge", f"{state}_nonce", stale=state == "stale")
        problem = self._malformed(credentials)
        if problem:
            return Verdict("refuse", problem)
        username = credentials.get("username")
        aor = f"{username}@{realm}"
        if aor.lower() != identity.lower():
            return Verdict("refuse", "identity_mismatch")
        if credentials.get("uri") != message.uri:
            return Verdict("refuse", "uri_mismatch")
        user = self._store.user(aor)
        algorithm = (credentials.get("algorithm") or "MD5").upper()
        if user is None:
            return Verdict("refuse", "unknown_user")
        ha1 = user.ha1_sha256 if algorithm == "SHA-256" else user.ha1_md5
        expected = response_for(
            algorithm, ha1, message.method, credentials.get("uri"), nonce,
            credentials.get("nc"), credentials.get("cnonce"), credentials.get("qop"),
        )  # fmt: skip
        response = credentials.get("response").lower()
        if not response.isascii() or not hmac.compare_digest(expected, response):
            return Verdict("refuse", "wrong_password")
        count = int(credentials.get("nc"), 16)
        if not self._store.advance_nonce_count(nonce, count, self._nonces.until(nonce)):
            return Verdict("challenge", "replayed_nc")
        return Verdict("ok", aor=user.aor)

    def _malformed(self, credentials: Credentials) -> str:
        """Why credentials cannot be checked ("" when they can): missing parts, an algorithm or qop not offered."""
        if not all(credentials.get(name) for name in ("username", "uri", "response", "nc", "cnonce")):
            return "malformed"
        if (credentials.get("algorithm") or "MD5").upper() not in self._algorithms:
            return "unsupported_algorithm"
        if credentials.get("qop").lower() != "auth":
            return "unsupported_qop"
        nc = credentials.get("nc")
        if len(nc) != NONCE_COUNT_DIGITS or not all(char in string.hexdigits for char in nc) or not int(nc, 16):
            return "malformed"
        return ""


def response_for(algorithm: str, ha1: str, method: str, uri: str, nonce: str, nc: str, cnonce: str, qop: str) -> str:
    """The expected ``response`` with qop=auth (RFC 7616 section 3.4.1): H(HA1:nonce:nc:cnonce:qop:H(method:uri))."""
    ha2 = hash_hex(algorithm, f"{method}:{uri}")
    return hash_hex(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
