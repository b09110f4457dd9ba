"""Flow tokens: HMAC-signed connection ids the proxy writes into Via and Record-Route.

A stateless proxy keeps nothing between a request and what follows it, so
it writes what it needs into the message itself, signed so that no peer can
forge or redirect it (connection ids are sequential; an unsigned id would
let anyone inject into another user's connection):

* **Via** (``swf``): ``<conn id>.<MAC>`` over the proxy's branch, the id of
  the connection the request came on, and the address a response falls
  back to when that connection is gone (the next Via's ``received`` and
  sent-by port, RFC 3261 section 18.2.2). Only a response whose top Via
  carries a valid token is relayed.
* **Record-Route** (``swr``, RFC 5626 section 5.3): ``<conn id>.<MAC>`` over the
  id and the dialog's Call-ID. The proxy record-routes each leg of a
  dialog with the id of that leg's connection (0 for a leg it reached by
  address), so in-dialog requests from either side come back through it
  and leave on the right connection whatever their Contact says. Binding
  the MAC to the Call-ID keeps a token learnt in one dialog useless in any other.

The key is a per-instance secret (``proxy-flow.key``, 0600 in the runtime
directory) shared by every worker, so any worker checks any token.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from sipwire.transport import sipsyntax
from sipwire.transport.routing import Destination
from sipwire.transport.sip import header_param
from sipwire.transport.sipuri import SipUriError, parse_uri

#: The Via parameter of the proxy's flow token.
FLOW_PARAM: Final = "swf"
#: The Record-Route URI parameter of a dialog leg's flow token.
ROUTE_PARAM: Final = "swr"
#: File of the per-instance key of the flow tokens, in the runtime directory (0600, shared by the workers).
FLOW_KEY_FILE: Final = "proxy-flow.key"
#: HMAC bytes kept in a token: 128 bits cannot be guessed, and keep the headers short.
FLOW_MAC_BYTES: Final = 16
#: Connection ids are 64-bit (the WRITE record's conn id field).
MAX_CONN_ID: Final = 2**64 - 1


class FlowTokens:
    """Makes and checks the proxy's Via and Record-Route tokens under one key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, text: str) -> str:
        return (
            hmac.new(self._key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()[:FLOW_MAC_BYTES].hex()
        )

    def mac(self, text: str) -> str:
        """A MAC of ``text`` under this instance's key (hex); for other values the proxy derives, such as tags."""
        return self._mac(f"other|{text}")

    # -- Via -----------------------------------------------------------------------------------------

    def via_token(self, branch: str, conn_id: int, fallback: Destination | None) -> str:
        """``<conn id>.<mac>``: the MAC binds the id to this branch and to the fallback address."""
        return f"{conn_id}.{self._mac(f'via|{branch}|{conn_id}|{_where(fallback)}')}"

    def verified_via(self, vias: list[str], index: int = 0) -> tuple[int, Destination | None] | None:
        """The connection id and fallback in ``vias[index]`` when this proxy wrote that Via, else None.

        The Via below it is the one the proxy filled with ``received`` when it forwarded the request, which
        gives the fallback the MAC covers.
        """
        if len(vias) < index + 2:
            return None
        token = header_param(vias[index], FLOW_PARAM)
        branch = header_param(vias[index], "branch")
        if not token or not branch:
            return None
        conn_id = sipsyntax.number(token.partition(".")[0], MAX_CONN_ID)
        if not conn_id:
            return None
        fallback = fallback_of(vias[index + 1])
        if not token.isascii() or not hmac.compare_digest(token, self.via_token(branch, conn_id, fallback)):
            return None
        return conn_id, fallback

    # -- Record-Route --------------------------------------------------------------------------------

    def route_token(self, conn_id: int, call_id: str) -> str:
        return f"{conn_id}.{self._mac(f'route|{conn_id}|{call_id}')}"

    def verified_route(self, token: str, call_id: str) -> int | None:
        """The connection id of a Record-Route token for this dialog (0: a leg reached by address), else None."""
        conn_id = sipsyntax.number(token.partition(".")[0], MAX_CONN_ID)
        if conn_id is None or not token.isascii() or not hmac.compare_digest(token, self.route_token(conn_id, call_id)):
            return None
        return conn_id


def _where(fallback: Destination | None) -> str:
    return f"{fallback.transport}|{fallback.host}|{fallback.port}" if fallback is not None else "-"


def fallback_of(via: str) -> Destination | None:
    """Where a response goes when its connection is gone (RFC 3261 18.2.2): ``received``, sent-by port.

    None for a WebSocket client (``WS``/``WSS``): it is reached over its own connection or not at all
    (its sent-by is usually a ``.invalid`` name, RFC 7118 section 5.2, and sipwire opens no WebSocket).
    """
    protocol, _, rest = via.partition(" ")
    sent_by = rest.split(";", 1)[0].strip()
    transport = protocol.rsplit("/", 1)[-1].lower()
    if transport in ("ws", "wss"):
        return None
    try:
        uri = parse_uri(f"sip:{sent_by}")
    except SipUriError:
        return None
    host = header_param(via, "received") or uri.host
    return Destination(transport if transport in ("tcp", "tls") else "tcp", host, uri.default_port())
