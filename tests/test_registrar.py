"""The proxy's registrar over real connections: digest auth, expiry rules, contacts, RFC 5626 flows."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sipwire.config import Settings
from sipwire.transport.routers.sqlitestore import open_store
from tests.conftest import REPO, RunningTransport, wait_for
from tests.sipphone import Phone, challenge_params, digest_credentials

StartTransport = Callable[..., RunningTransport]
USERS = {"alice@sip.test": "alice-secret", "bob@sip.test": "bob-secret"}
INSTANCE = '"<urn:uuid:00000000-0000-1000-8000-00aa00bb00cc>"'


def _proxy(start_transport: StartTransport, *args: str, env: dict[str, str] | None = None) -> RunningTransport:
    return start_transport(*args, router="proxy", workers=2, users=USERS, env=env)


def _expires_of(contact: str) -> int:
    return int(contact.rpartition(";expires=")[2].split(";")[0])


def test_register_is_challenged_sha256_first_then_md5_and_both_work(start_transport: StartTransport) -> None:
    proxy = _proxy(start_transport)
    with Phone(proxy, "alice@sip.test", USERS["alice@sip.test"]) as alice:
        alice.send(alice.request("REGISTER", "sip:sip.test", headers=[("Contact", f"<{alice.contact}>")]))
        challenge = alice.read()
        assert challenge.status == 401
        offered = [challenge_params(value) for value in challenge.header_lines("www-authenticate")]
        assert [params["algorithm"] for params in offered] == ["SHA-256", "MD5"]
        assert all(params["qop"] == "auth" and params["realm"] == "sip.test" for params in offered)
        assert alice.register(algorithm="SHA-256").status == 200
        answer = alice.register("<sip:alice@127.0.0.9:7000;transport=tcp>", algorithm="MD5")
        assert answer.status == 200
        assert len(answer.values("contact")) == 2
    counters = proxy.counters()
    assert counters["auth.ok"] == 2
    assert counters["auth.challenged"] >= 3


def test_wrong_credentials_are_refused_403_and_counted_by_reason(start_transport: StartTransport) -> None:
    proxy = _proxy(start_transport)
    with Phone(proxy, "alice@sip.test", "not-her-password") as alice:
        assert alice.register().status == 403
    with Phone(proxy, "carol@sip.test", "whatever-pass") as carol:
        assert carol.register().status == 403
    with Phone(proxy, "dave@elsewhere.test", "whatever-pass") as dave:
        answer = dave.register()
        assert (answer.status, answer.reason) == (403, "Forbidden (domain not served here)")
    counters = proxy.counters()
    assert counters["auth_failed.wrong_password"] == 1
    assert counters["auth_failed.unknown_user"] == 1
    assert counters["registrar.refused"] == 1
    assert "not-her-password" not in proxy.log_text()


def test_a_replayed_nonce_count_and_a_forged_nonce_are_challenged_again(start_transport: StartTransport) -> None:
    proxy = _proxy(start_transport)
    with Phone(proxy, "alice@sip.test", USERS["alice@sip.test"]) as alice:
        uri = "sip:sip.test"
        alice.send(alice.request("REGISTER", uri, headers=[("Contact", f"<{alice.contact}>")]))
        challenge = alice.read().header_lines("www-authenticate")[0]
        first = digest_credentials(challenge, "REGISTER", uri, "alice", USERS["alice@sip.test"], nc=1)
        headers = [("Contact", f"<{alice.contact}>"), ("Authorization", first)]
        alice.send(alice.request("REGISTER", uri, headers=headers))
        assert alice.read().status == 200
        alice.send(alice.request("REGISTER", uri, headers=headers))  # the same nc again: a replay
        replayed = alice.read()
        assert replayed.status == 401
        assert "stale=true" not in replayed.header_lines("www-authenticate")[0]
        second = digest_credentials(challenge, "REGISTER", uri, "alice", USERS["alice@sip.test"], nc=2)
        alice.send(
            alice.request("REGISTER", uri, headers=[("Contact", f"<{alice.contact}>"), ("Authorization", second)])
        )
        assert alice.read().status == 200
        params = challenge_params(challenge)
        forged = challenge.replace(params["nonce"], params["nonce"][:-4] + "0000")
        bad = digest_credentials(forged, "REGISTER", uri, "alice", USERS["alice@sip.test"])
        alice.send(alice.request("REGISTER", uri, headers=[("Contact", f"<{alice.contact}>"), ("Authorization", bad)]))
        assert alice.read().status == 401
    counters = proxy.counters()
    assert counters["auth_failed.replayed_nc"] == 1
    assert counters["auth_failed.invalid_nonce"] == 1


def test_an_expired_nonce_is_answered_stale_and_any_worker_accepts_a_fresh_one(start_transport: StartTransport) -> None:
    proxy = _proxy(start_transport, env={"SIPWIRE_DIGEST_NONCE_SECONDS": "2"})
    with Phone(proxy, "alice@sip.test", USERS["alice@sip.test"]) as alice:
        uri = "sip:sip.test"
        alice.send(alice.request("REGISTER", uri, headers=[("Contact", f"<{alice.contact}>")]))
        challenge = alice.read().header_lines("www-authenticate")[0]
        time.sleep(3.2)
        old = digest_credentials(challenge, "REGISTER", uri, "alice", USERS["alice@sip.test"])
        alice.send(alice.request("REGISTER", uri, headers=[("Contact", f"<{alice.contact}>"), ("Authorization", old)]))
        stale = alice.read()
        assert stale.status == 401
        assert all("stale=true" in value for value in stale.header_lines("www-authenticate"))
        assert alice.register().status == 200
    assert proxy.counters()["auth_failed.stale_nonce"] == 1


def test_expiry_rules_423_cap_instance_param_and_wildcard(start_transport: StartTransport) -> None:
    proxy = _proxy(start_transport)
    with Phone(proxy, "alice@sip.test", USERS["alice@sip.test"]) as alice:
        # expires=600 after a quoted, bracketed +sip.instance: the header parameter is found (it was 3600).
        answer = alice.register(f"<{alice.contact}>;+sip.instance={INSTANCE};expires=600")
        assert answer.status == 200
        assert 595 <= _expires_of(answer.header("contact") or "") <= 600
        brief = alice.register(f"<{alice.contact}>", headers=[("Expires", "30")])
        assert (brief.status, brief.header("min-expires")) == (423, "60")
        long = alice.register("<sip:alice@127.0.0.9:7001>;expires=100000")
        assert long.status == 200
        granted = sorted(_expires_of(value) for value in long.values("contact"))
        assert granted[-1] == 3600
        removed = alice.register(f"<{alice.contact}>;+sip.instance={INSTANCE};expires=0")
        assert [value.startswith("<sip:alice@127.0.0.9:7001>") for value in removed.values("contact")] == [True]
        bad = alice.register("*")
        assert bad.status == 400
        cleared = alice.register("*", headers=[("Expires", "0")])
        assert cleared.status == 200 and cleared.values("contact") == []


def test_several_contacts_q_values_and_an_out_of_order_cseq(start_transport: StartTransport) -> None:
    proxy = _proxy(start_transport)
    with Phone(proxy, "bob@sip.test", USERS["bob@sip.test"]) as bob:
        answer = bob.register("<sip:bob@127.0.0.9:7002>;q=0.5, <sip:bob@127.0.0.9:7003>;q=1.0")
        assert answer.status == 200
        contacts = answer.values("contact")
        assert contacts[0].startswith("<sip:bob@127.0.0.9:7003>") and ";q=1.0" in contacts[0]
        assert bob.register("<sip:bob@127.0.0.9:7004>;q=2").status == 400
        bob.cseq = 0  # the same Call-ID, CSeq back to 2 (the first binding's): RFC 3261 section 10.3 step 7
        assert bob.register("<sip:bob@127.0.0.9:7002>").status == 500


def test_an_outbound_flow_is_replaced_on_reconnect_and_removed_when_its_connection_closes(
    start_transport: StartTransport,
) -> None:
    proxy = _proxy(start_transport)
    store_settings = Settings(instance="test0", state_dir=str(proxy.control_path.parent.parent))
    flow = f";+sip.instance={INSTANCE};reg-id=1"
    first = Phone(proxy, "alice@sip.test", USERS["alice@sip.test"])
    answer = first.register(f"<{first.contact}>{flow}", headers=[("Supported", "outbound, path")])
    assert answer.status == 200 and answer.header("require") == "outbound"
    with Phone(proxy, "alice@sip.test", USERS["alice@sip.test"]) as second:
        again = second.register(f"<{second.contact}>{flow}", headers=[("Supported", "outbound")])
        assert [value.partition(">")[0] for value in again.values("contact")] == [f"<{second.contact}"]
        second.close()
        wait_for(lambda: proxy.counters().get("registrar.flows_closed") == 1, what="the flow removed on close")
    store = open_store(store_settings)
    try:
        assert store.bindings("alice@sip.test", time.time()) == []
    finally:
        store.close()
    first.close()


def test_the_proxy_refuses_to_start_without_users_unless_open_registrar(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "sipwire.cli", "transport", "--router", "proxy", "--tcp", "127.0.0.1:0"]
    command += ["--tls", "", "--state-dir", str(tmp_path), "--instance", "nousers", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env, cwd=REPO, check=False)
    assert refused.returncode == 1
    assert "has no users and open_registrar is not set" in refused.stderr


def test_open_registrar_is_logged_at_start(start_transport: StartTransport) -> None:
    proxy = start_transport("--open-registrar", router="proxy", workers=1)
    assert "open_registrar is set: the proxy authenticates nobody" in proxy.log_text()


def _users(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sipwire.cli", "users", "--state-dir", str(tmp_path), "--instance", "u", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=30, env=env, cwd=REPO, check=False
    )


def test_users_command_add_list_passwd_remove_without_showing_secrets(tmp_path: Path) -> None:
    assert _users(tmp_path, "add", "alice@SIP.test", stdin="first-password\n").returncode == 0
    assert _users(tmp_path, "add", "bob@sip.test", "--password", "second-password").returncode == 0
    duplicate = _users(tmp_path, "add", "alice@sip.test", "--password", "third-password")
    assert duplicate.returncode == 1 and "exists already" in duplicate.stderr
    assert _users(tmp_path, "add", "nodomain", "--password", "third-password").returncode == 1
    assert _users(tmp_path, "add", "carol@sip.test", "--password", "short").returncode == 1
    listed = _users(tmp_path, "list")
    assert listed.stdout.splitlines() == ["alice@sip.test  realm sip.test", "bob@sip.test  realm sip.test"]
    assert _users(tmp_path, "passwd", "bob@sip.test", stdin="new-password\n").returncode == 0
    assert _users(tmp_path, "remove", "alice@sip.test").returncode == 0
    assert _users(tmp_path, "remove", "alice@sip.test").returncode == 1
    database = tmp_path / "u" / "registrar.sqlite3"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    content = database.read_bytes()
    assert b"second-password" not in content and b"new-password" not in content
