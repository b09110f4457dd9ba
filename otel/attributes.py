"""Attribute names (OpenTelemetry semantic conventions) and the resource of each sipwire process.

The names are plain strings, written once here: the conventions' Python
package keeps many of them in "incubating" modules that move between
releases. ``sip.*`` names are sipwire's own (the conventions have no SIP
namespace yet); ``sipwire.*`` names are internal identifiers.
"""

from __future__ import annotations

import os
from typing import Final

from opentelemetry.sdk.resources import Resource

NETWORK_TRANSPORT: Final = "network.transport"
NETWORK_PROTOCOL_NAME: Final = "network.protocol.name"
NETWORK_PEER_ADDRESS: Final = "network.peer.address"
NETWORK_PEER_PORT: Final = "network.peer.port"
NETWORK_LOCAL_ADDRESS: Final = "network.local.address"
NETWORK_LOCAL_PORT: Final = "network.local.port"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
TLS_PROTOCOL_NAME: Final = "tls.protocol.name"
TLS_PROTOCOL_VERSION: Final = "tls.protocol.version"
TLS_CIPHER: Final = "tls.cipher"
TLS_ESTABLISHED: Final = "tls.established"
ERROR_TYPE: Final = "error.type"
SIP_METHOD: Final = "sip.method"
SIP_STATUS_CODE: Final = "sip.status_code"
SIP_CALL_ID: Final = "sip.call_id"
SIP_TRANSPORT: Final = "sip.transport"
CONNECTION_ID: Final = "sipwire.connection.id"

SERVICE_TRANSPORT: Final = "sipwire-transport"
SERVICE_WORKER: Final = "sipwire-worker"
SCOPE_NAME: Final = "sipwire"
SCOPE_VERSION: Final = "0.1.0"

Attributes = dict[str, str | bool | int | float]


def tls_version(version: str) -> str:
    """``tls.protocol.version`` from OpenSSL's name: ``TLSv1.3`` -> ``1.3`` (others unchanged)."""
    return version[4:] if version.startswith("TLSv") else version


def connection_attributes(
    transport: str,
    local: tuple[str, int] | None,
    remote: tuple[str, int] | None,
    outbound: bool,
    tls: tuple[str, str] | None,
) -> Attributes:
    """The network, server and TLS attributes of one connection.

    ``server.*`` names the SIP server side of the connection: this process
    for a connection it accepted, the peer for one it opened.
    """
    attributes: Attributes = {NETWORK_TRANSPORT: "tcp", NETWORK_PROTOCOL_NAME: "sip", SIP_TRANSPORT: transport}
    if remote is not None and remote[0]:
        attributes[NETWORK_PEER_ADDRESS] = remote[0]
        attributes[NETWORK_PEER_PORT] = remote[1]
    if local is not None and local[0] and local[0] not in ("0.0.0.0", "::"):
        attributes[NETWORK_LOCAL_ADDRESS] = local[0]
        attributes[NETWORK_LOCAL_PORT] = local[1]
    server = remote if outbound else local
    if server is not None and server[0] and server[0] not in ("0.0.0.0", "::"):
        attributes[SERVER_ADDRESS] = server[0]
        attributes[SERVER_PORT] = server[1]
    if transport in {"tls", "wss"}:
        attributes[TLS_PROTOCOL_NAME] = "tls"
        if tls is not None:  # (OpenSSL version name, cipher)
            attributes[TLS_PROTOCOL_VERSION] = tls_version(tls[0])
            attributes[TLS_CIPHER] = tls[1]
    return attributes


def resource(service_name: str, instance: str, pid: int | None = None) -> Resource:
    """The resource of process ``pid`` (default: this one): ``OTEL_RESOURCE_ATTRIBUTES`` under sipwire's names."""
    pid = os.getpid() if pid is None else pid
    return Resource.create(
        {
            "service.name": service_name,
            "service.namespace": "sipwire",
            "service.version": SCOPE_VERSION,
            "service.instance.id": f"{instance}-{pid}",
            "process.pid": pid,
        }
    )
