"""The ``proxy`` router: a stateless proxy (RFC 3261 section 16.11) and registrar for phones.

What each part does, one module each:

* ``registrar.py``: REGISTER, authenticated with digest (``digest.py``), stored
  by a :class:`~transport.routers.store.RegistrarStore` (``sqlitestore.py``:
  SQLite shared by every worker). Each binding remembers its flow, the
  connection it came on: a TCP or TLS phone is reachable only there.
* ``forward.py``: every other request: loose routing, loop detection,
  Max-Forwards, authentication of the served domains' users, the
  Request-URI rewritten to the registered contact, Record-Route with a flow
  token per leg so in-dialog requests leave on the right connection.
* here: responses, relayed only through a Via this proxy made (its flow
  token, ``flowtoken.py``): the proxy's Via is removed and the response sent
  on the connection the token names, else to the token's fallback address;
  and the router hooks: ``preflight`` (refuse to start without users unless
  ``open_registrar``), ``setup`` (per worker), ``connections_closed`` (drop
  the RFC 5626 flows whose connection closed).

Stateless means no transaction layer: no forking (one contact per request,
the highest q), no retransmission timers (TCP and TLS are reliable), CANCEL
and the ACK of a non-2xx answer forwarded with the INVITE's branch. Why,
and what that leaves out: docs/ROUTERS.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sipwire.config import Settings
from sipwire.errors import ConfigurationError
from sipwire.statedir import instance_secret, runtime_directory
from sipwire.transport.routers.digest import NONCE_KEY_FILE, DigestAuth, Nonces
from sipwire.transport.routers.flowtoken import FLOW_KEY_FILE, FlowTokens
from sipwire.transport.routers.forward import forward
from sipwire.transport.routers.proxystate import COUNT_FLOWS_CLOSED, COUNT_RELAYED, COUNT_UNVERIFIED, ProxyState
from sipwire.transport.routers.registrar import register
from sipwire.transport.routers.rewrite import without_top_via
from sipwire.transport.routers.sqlitestore import StoreBusyError, open_store
from sipwire.transport.routing import Destination, Outcome, RouteContext
from sipwire.transport.sip import SipMessage
from sipwire.transport.sipuri import parse_uri

log = logging.getLogger("sipwire.proxy")


class NoUsersError(ConfigurationError):
    """``--router proxy`` without any user and without ``open_registrar``: it would authenticate nobody."""


_state: ProxyState | None = None


def preflight(settings: Settings) -> None:
    """Called by the transport before it starts: no users and no ``open_registrar`` is refused; open is logged."""
    store = open_store(settings)
    try:
        users = len(store.users())
    finally:
        store.close()
    if settings.open_registrar:
        log.warning(
            "open_registrar is set: the proxy authenticates nobody; any REGISTER binds any address-of-record "
            "and any request is relayed (labs only)"
        )
    elif not users:
        raise NoUsersError(
            "the proxy router has no users and open_registrar is not set: add one with "
            "`sipwire users add USER@DOMAIN`, or set --open-registrar for a lab"
        )
    else:
        log.info("proxy: %d users, digest %s", users, settings.digest_algorithms)


def setup(settings: Settings) -> None:
    """Called once per worker before the first message."""
    global _state  # noqa: PLW0603 - one router state per worker process, set once at start
    directory = runtime_directory(settings)
    store = open_store(settings, soft_state=True)
    upstream = None
    if settings.upstream:
        uri = parse_uri(settings.upstream)
        upstream = Destination(uri.transport, uri.host, uri.default_port())
    auth = None
    if not settings.open_registrar:
        nonces = Nonces(instance_secret(directory, NONCE_KEY_FILE), settings.digest_nonce_seconds)
        auth = DigestAuth(store, nonces, settings.offered_digest_algorithms)
    _state = ProxyState(settings, store, FlowTokens(instance_secret(directory, FLOW_KEY_FILE)), auth, upstream)


def route(message: SipMessage, ctx: RouteContext) -> None:
    state = _state
    if state is None:
        raise RuntimeError("proxy router used without setup(); load it with --router proxy")
    _purge_now_and_then(state)
    if not message.is_request:
        _relay_response(state, message, ctx)
    elif message.method == "REGISTER":
        register(state, message, ctx)
    else:
        forward(state, message, ctx)


def connections_closed(conn_ids: list[int], count: Callable[[str], None]) -> None:
    """The transport's CONNECTIONS_CLOSED: the bindings of those flows go at once.

    Every worker gets the announcement; the first to run it removes the rows, so each removal is counted once.
    """
    if _state is None:
        return
    try:
        for _ in range(_state.store.connections_closed(conn_ids)):
            count(COUNT_FLOWS_CLOSED)
    except StoreBusyError as error:  # they expire anyway, and a send to one removes it
        _state.ratelog.log(logging.WARNING, "flows_not_removed", "bindings of closed connections kept: %s", error)


def _purge_now_and_then(state: ProxyState) -> None:
    now = time.time()
    if now < state.next_purge:
        return
    state.next_purge = now + state.settings.registrar_purge_seconds
    try:
        state.store.purge(now)
    except StoreBusyError:
        return  # another worker is writing; the next purge catches up


def _relay_response(state: ProxyState, message: SipMessage, ctx: RouteContext) -> None:
    vias = message.values("via")
    flow = state.tokens.verified_via(vias)
    if flow is None:
        ctx.count(COUNT_UNVERIFIED)
        state.ratelog.log(
            logging.WARNING, "unverified_response",
            "dropped a response from %s:%d: its top Via carries no flow token of this proxy (%.80r)",
            *ctx.envelope.remote, vias[0] if vias else "no Via",
        )  # fmt: skip
        return
    conn_id, fallback = flow
    data = without_top_via(message)
    ctx.count(COUNT_RELAYED)

    def on_outcome(outcome: Outcome) -> None:
        if not outcome.ok and fallback is not None:
            ctx.send(fallback, data)

    ctx.send_on(conn_id, data, on_outcome, failures_only=True)
