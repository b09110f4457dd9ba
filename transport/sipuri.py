"""SIP URIs and name-addr values: just enough to route (RFC 3261 sections 19.1 and 20.10)."""

from __future__ import annotations

from dataclasses import dataclass

from sipwire.errors import ProtocolError
from sipwire.transport import sipsyntax


class SipUriError(ProtocolError, ValueError):
    """A value is not a usable sip:/sips: URI; the message quotes it."""


@dataclass(frozen=True, slots=True)
class SipUri:
    scheme: str
    user: str
    host: str
    port: int | None
    params: dict[str, str]

    @property
    def transport(self) -> str:
        """The ``transport`` parameter, lower-cased; ``tls`` for sips:, else ``tcp``."""
        default = "tls" if self.scheme == "sips" else "tcp"
        return self.params.get("transport", default).lower()

    def default_port(self) -> int:
        return self.port if self.port is not None else (5061 if self.transport == "tls" else 5060)

    @property
    def address_of_record(self) -> str:
        """``scheme:user@host`` without port or parameters, lower-cased host: a registrar key."""
        user = f"{self.user}@" if self.user else ""
        return f"{self.scheme}:{user}{self.host.lower()}"


def uri_of(name_addr: str) -> str:
    """The URI inside a name-addr (``"Bob" <sip:bob@host>;tag=1``) or addr-spec value."""
    start = name_addr.find("<")
    if start >= 0:
        end = name_addr.find(">", start)
        if end < 0:
            raise SipUriError(f"unclosed '<' in {name_addr[:80]!r}")
        return name_addr[start + 1 : end].strip()
    return name_addr.split(";", 1)[0].strip()


def parse_uri(text: str) -> SipUri:
    if not sipsyntax.is_utf8(text):  # a URI is ASCII (RFC 3261 section 25.1); UTF-8 is tolerated, other bytes not
        raise SipUriError(f"{text[:80]!r} is not UTF-8")
    scheme, colon, rest = text.strip().partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in ("sip", "sips"):
        raise SipUriError(f"{text[:80]!r} is not a sip: or sips: URI")
    rest = rest.split("?", 1)[0]
    hostport, _, param_text = rest.partition(";")
    user, at, host_part = hostport.rpartition("@")
    if not at:
        user, host_part = "", hostport
    host, port = _split_host_port(host_part, text)
    params: dict[str, str] = {}
    for param in param_text.split(";") if param_text else ():
        name, _, value = param.partition("=")
        params[name.strip().lower()] = value.strip()
    return SipUri(scheme, user, host, port, params)


def _split_host_port(value: str, text: str) -> tuple[str, int | None]:
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise SipUriError(f"unclosed IPv6 reference in {text[:80]!r}")
        host, after = value[1:end], value[end + 1 :]
        if after and not after.startswith(":"):
            raise SipUriError(f"{after[:20]!r} after an IPv6 reference in {text[:80]!r}")
        port_text = after[1:]
    else:
        host, _, port_text = value.partition(":")
    if not host:
        raise SipUriError(f"no host in {text[:80]!r}")
    if not port_text:
        return host, None
    port = sipsyntax.port(port_text)
    if port is None:
        raise SipUriError(f"invalid port {port_text[:20]!r} in {text[:80]!r}")
    return host, port
