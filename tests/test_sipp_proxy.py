"""Interop with the real sipp through the proxy router: digest REGISTER, a wrong password, a call.

sipp computes its own digest answers (its ``[authentication]`` keyword with
``-au``/``-ap``), so these tests check sipwire's challenges against another
implementation. The call runs between two sipp processes: the callee
registers over its connection with a Contact nobody listens on, the caller
INVITEs it through sipwire (407 first), and the ACK and BYE follow the
Record-Route set back down the callee's connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sipwire.config import Settings
from sipwire.transport.routers.sqlitestore import open_store
from tests.conftest import RunningTransport, wait_for, write_config
from tests.console_process import RunningConsole, console_starter
from tests.sipp import SIPP, Sipp, SippResult, run_sipp

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.skipif(SIPP is None, reason="sipp is not on PATH (install the Debian package sip-tester)"),
]

StartTransport = Callable[..., RunningTransport]
USERS = {"alice@sip.test": "alice-secret", "bob@sip.test": "bob-secret"}
#: sipp 3.6 answers the first challenge it is given and knows MD5 only (SHA-256 came in later releases).
SIPP_ENV = {"SIPWIRE_DIGEST_ALGORITHMS": "MD5"}
#: Both sipp processes name their calls alike, so the callee maps the caller's INVITE to its own call.
CALL_ID_FORMAT = "sipwire-call-%u"


def _proxy(start_transport: StartTransport) -> RunningTransport:
    return start_transport(router="proxy", workers=2, users=USERS, env=SIPP_ENV)


def _clean(result: SippResult) -> None:
    details = result.describe()
    assert result.returncode == 0, details
    assert (result.successful, result.failed, result.unexpected()) == (1, 0, 0), details


def _credentials(user: str, password: str, request_uri: str) -> list[str]:
    """sipp's digest user and password; its digest ``uri`` is the target address unless -auth_uri names the
    Request-URI (without ``sip:``), which sipwire checks against it (RFC 3261 section 22.4)."""
    return ["-au", user, "-ap", password, "-auth_uri", request_uri]


def _run(proxy: RunningTransport, workdir: Path, scenario: str, user: str, password: str, **options: Any) -> SippResult:
    """One sipp REGISTER call over one connection; ``options`` override run_sipp's (calls, local_ip...)."""
    arguments: dict[str, Any] = {"transport": "t1", "calls": 1, "rate": 1, "timeout": 15, **options}
    return run_sipp(
        proxy.host, proxy.port, workdir, scenario=scenario, extra_args=_credentials(user, password, "sip.test"),
        **arguments,
    )  # fmt: skip


def test_sipp_registers_with_digest_and_a_wrong_password_ends_in_403(
    start_transport: StartTransport, tmp_path: Path
) -> None:
    proxy = _proxy(start_transport)
    _clean(_run(proxy, tmp_path / "ok", "register_digest.xml", "alice", USERS["alice@sip.test"]))
    wrong = _run(proxy, tmp_path / "wrong", "register_forbidden.xml", "alice", "not-the-password")
    _clean(wrong)
    assert wrong.received(403) == 1
    counters = proxy.counters()
    assert counters["auth.ok"] == 1
    assert counters["auth_failed.wrong_password"] == 1
    assert counters["registrar.registered"] == 1


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[Callable[..., RunningConsole]]:
    yield from console_starter(tmp_path)


def test_a_password_scan_blocks_its_source_and_spares_the_others(
    start_transport: StartTransport, start_console: Callable[..., RunningConsole], tmp_path: Path
) -> None:
    """sipp guesses alice's password from 127.0.0.2, a new connection per guess; 127.0.0.3 is alice's phone."""
    config = write_config(tmp_path, auth_failures_per_ip=3, auth_failure_window=30, source_limits_allow="")
    proxy = start_transport("--config", str(config), router="proxy", workers=2, users=USERS, env=SIPP_ENV)
    scan = _run(
        proxy, tmp_path / "scan", "register_forbidden.xml", "alice", "guess", transport="tn", calls=6, rate=5,
        timeout=10, local_ip="127.0.0.2",
    )  # fmt: skip
    assert scan.received(403) == 3, scan.describe()  # the third closes its connection after the 403
    assert scan.received(401) == 3, scan.describe()  # no later guess is answered at all
    # Then the address is refused at accept. When sipp's REGISTER is already in the connection, the close
    # resets it and sipp stops at that guess; when the close comes first, sipp counts a closed connection
    # and guesses again (at most its 6 calls), to be refused in turn.
    refused = scan.created - 3
    assert 1 <= refused <= 3 and scan.successful == 3, scan.describe()
    assert scan.sent("REGISTER") == 3 + 3 + refused, scan.describe()  # each answered guess twice, then one each
    assert "remote peer probably closed the socket" in scan.errors or refused == 3, scan.describe()
    counters = proxy.counters()
    assert counters["auth_failed.wrong_password"] == 3
    assert counters["limited.auth_failures"] == 1
    assert counters["refused.auth_failures"] == refused
    _clean(
        _run(proxy, tmp_path / "phone", "register_digest.xml", "alice", USERS["alice@sip.test"], local_ip="127.0.0.3")
    )
    blocked = _run(
        proxy, tmp_path / "late", "register_digest.xml", "alice", USERS["alice@sip.test"], timeout=5,
        local_ip="127.0.0.2",
    )  # fmt: skip
    assert (blocked.successful, blocked.received(200)) == (0, 0), blocked.describe()  # the right password too
    counters = proxy.counters()
    assert (counters["auth.ok"], counters["registrar.registered"]) == (1, 1)
    console = start_console(proxy)  # operators see it on the Edge protection panel and in /metrics
    with console.client() as browser:
        wait_for(
            lambda: all(
                name in browser.get("/").text.partition('data-testid="edge"')[2]
                for name in ("refused.auth_failures", "limited.auth_failures")
            ),
            what="the blocked source on the console's overview",
        )
        assert 'sipwire_events_total{event="limited.auth_failures"} 1' in browser.get("/metrics").text


def test_a_sipp_call_reaches_a_sipp_callee_over_its_registered_connection(
    start_transport: StartTransport, tmp_path: Path
) -> None:
    proxy = _proxy(start_transport)
    store_settings = Settings(instance="test0", state_dir=str(proxy.control_path.parent.parent))
    common = ["-cid_str", CALL_ID_FORMAT]
    with Sipp(
        proxy.host, proxy.port, tmp_path / "callee", scenario="callee_registered.xml", transport="t1", calls=1,
        rate=1, timeout=20, extra_args=[*common, *_credentials("bob", USERS["bob@sip.test"], "sip.test")],
    ) as callee:  # fmt: skip

        def registered() -> bool:
            store = open_store(store_settings)
            try:
                return bool(store.registrations(0.0))
            finally:
                store.close()

        wait_for(registered, what="the sipp callee registered")
        caller = run_sipp(
            proxy.host, proxy.port, tmp_path / "caller", scenario="caller_through_proxy.xml", transport="t1",
            calls=1, rate=1, timeout=15,
            extra_args=[*common, *_credentials("alice", USERS["alice@sip.test"], "bob@sip.test")],
        )  # fmt: skip
        _clean(caller)
        _clean(callee.wait())
    counters = proxy.counters()
    assert counters["proxy.record_routed"] == 1
    assert counters["proxy.in_dialog"] == 2  # the ACK and the BYE, both down the callee's connection
    assert counters["proxy.ack_absorbed"] == 1  # the caller's ACK for the 407
