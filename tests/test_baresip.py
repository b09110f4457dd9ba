"""Interop with real phones: two baresip user agents call each other through the proxy router.

Bob registers over TLS, Alice over TCP, both with digest and RFC 5626
outbound (``+sip.instance``, ``reg-id``); each puts its ephemeral port in
its Contact, so only the connection it registered on reaches it. Alice
dials ``sip:bob@sip.test``; sipwire challenges her (407), rewrites the
Request-URI to Bob's contact and sends the INVITE down Bob's TLS
connection, record-routing both legs; Bob answers by himself; the call is up
for two seconds, then Alice hangs up and the BYE reaches Bob through the
Record-Route flow token. Both phones must report the call established
and closed (``ctrl_tcp`` events), and sipwire's counters must show it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.baresip import BARESIP, Baresip
from tests.conftest import RunningTransport

pytestmark = pytest.mark.skipif(BARESIP is None, reason="baresip is not on PATH (install the Debian package baresip)")

USERS = {"alice@sip.test": "alice-secret", "bob@sip.test": "bob-secret"}
#: Debian 12's baresip 1.0 (libre 1.x) stops at the first challenge whose algorithm it does not know.
OLD_PHONES_ENV = {"SIPWIRE_DIGEST_ALGORITHMS": "MD5"}
CALL_SECONDS = 2.0


def test_two_baresip_phones_register_over_tls_and_tcp_and_call_each_other(
    start_transport: Callable[..., RunningTransport], tmp_path: Path
) -> None:
    proxy = start_transport(router="proxy", workers=2, users=USERS, env=OLD_PHONES_ENV)
    tls_proxy, tcp_proxy = f"127.0.0.1:{proxy.tls_port}", f"127.0.0.1:{proxy.port}"
    with (
        Baresip(tmp_path, "bob", "bob@sip.test", USERS["bob@sip.test"], tls_proxy, "tls") as bob,
        Baresip(tmp_path, "alice", "alice@sip.test", USERS["alice@sip.test"], tcp_proxy, "tcp") as alice,
    ):
        bob.wait_event("REGISTER_OK")
        alice.wait_event("REGISTER_OK")
        alice.command("dial", "sip:bob@sip.test")
        alice.wait_event("CALL_ESTABLISHED")
        bob.wait_event("CALL_ESTABLISHED")
        time.sleep(CALL_SECONDS)
        alice.command("hangup")
        alice.wait_event("CALL_CLOSED")
        bob.wait_event("CALL_CLOSED")
    counters = proxy.counters()
    assert counters["registrar.registered"] >= 2
    assert counters["auth.ok"] >= 3  # two REGISTERs and the INVITE
    assert counters["proxy.record_routed"] == 1
    assert counters["proxy.in_dialog"] >= 2  # at least the ACK and the BYE
    assert counters.get("proxy.responses_dropped", 0) == 0
