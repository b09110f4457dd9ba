"""Sans-IO parts of the proxy: header parameters, digest vectors, nonces, REGISTER rules, the close record."""

from __future__ import annotations

import hashlib

import pytest

from sipwire.transport.routers.digest import Nonces, credentials_for, parse_credentials, response_for
from sipwire.transport.routers.flowtoken import FlowTokens
from sipwire.transport.routers.store import Binding, RegisterRequest, UserError, plan_register, split_aor
from sipwire.transport.sip import header_param, header_params
from sipwire.transport.wire import (
    MAX_CLOSED_PER_RECORD,
    ConnectionsClosedRecord,
    RecordReader,
    WireError,
    encode_connections_closed,
)

INSTANCE = '"<urn:uuid:00000000-0000-1000-8000-00aa00bb00cc>"'


def test_a_parameter_after_a_quoted_bracketed_instance_is_found() -> None:
    contact = f"<sip:alice@10.0.0.1:5070;transport=tcp>;+sip.instance={INSTANCE};reg-id=1;expires=600"
    assert header_param(contact, "expires") == "600"
    assert header_param(contact, "+sip.instance") == INSTANCE
    assert header_param(contact, "transport") is None  # a URI parameter, not the header's
    assert header_params('"A;b<c" <sip:x@y;lr>;tag=9') == [("tag", "9")]
    assert header_param("sip:bob@host;expires=0", "expires") == "0"  # an addr-spec's header parameters
    assert header_param("SIP/2.0/TCP h:5060;branch=z9hG4bKx;rport", "rport") == ""


def test_digest_responses_match_the_rfc_examples() -> None:
    # RFC 2617 section 3.5 (MD5, qop=auth) and RFC 7616 section 3.9.1 (SHA-256).
    md5_ha1 = "939e7578ed9e3c518a452acee763bce9"
    nonce = "dcd98b7102dd2f0e8b11d0f600bfb0c093"
    expected = "6629fae49393a05397450978507c4ef1"
    assert response_for("MD5", md5_ha1, "GET", "/dir/index.html", nonce, "00000001", "0a4f113b", "auth") == expected
    sha_ha1 = "7987c64c30e25f1b74be53f966b49b90f2808aa92faf9a00262392d7b4794232"
    assert response_for(
        "SHA-256", sha_ha1, "GET", "/dir/index.html", "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        "00000001", "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", "auth",
    ) == "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"  # fmt: skip
    user = credentials_for("Mufasa@Example.test", "Circle Of Life")
    assert user.aor == "Mufasa@example.test"
    assert user.ha1_md5 == hashlib.md5(b"Mufasa:example.test:Circle Of Life").hexdigest()
    assert user.ha1_sha256 == hashlib.sha256(b"Mufasa:example.test:Circle Of Life").hexdigest()


def test_credentials_parse_quoted_and_plain_values() -> None:
    parsed = parse_credentials(
        'Digest username="al\\"ice", realm="sip.test",nonce="n1", uri="sip:sip.test", response="r", '
        'algorithm=SHA-256, qop=auth, nc=00000001, cnonce="c, d"'
    )
    assert parsed is not None
    assert parsed.get("username") == 'al"ice' and parsed.get("cnonce") == "c, d" and parsed.get("nc") == "00000001"
    assert parse_credentials("Basic YWxhZGRpbjpvcGVuc2VzYW1l") is None


def test_nonces_are_checked_without_state() -> None:
    nonces = Nonces(b"k" * 32, lifetime=30)
    nonce = nonces.new(1_000_000)
    assert nonces.check(nonce, 1_000_010) == "valid"
    assert nonces.check(nonce, 1_000_031) == "stale"
    assert Nonces(b"other key" * 4, lifetime=30).check(nonce, 1_000_010) == "invalid"
    assert nonces.check(nonce[:-1] + ("0" if nonce[-1] != "0" else "1"), 1_000_010) == "invalid"
    assert nonces.check("short", 1_000_010) == "invalid"


def _binding(key: str, call_id: str, cseq: int, expires: float) -> Binding:
    return Binding("a@d", key, f"sip:{key}@h", "", 0, "", 1, "tcp", "l", "r", expires, call_id, cseq, "", 0.0)


def test_register_rules_cseq_order_removal_and_the_contact_cap() -> None:
    existing = {"uri x": _binding("uri x", "c1", 5, 200.0)}
    stale = RegisterRequest("a@d", "c1", 5, wildcard=False, bindings=[_binding("uri x", "c1", 5, 300.0)])
    assert plan_register(existing, stale, 10, 100.0).status.reason == "out_of_order"
    other_call = RegisterRequest("a@d", "c2", 1, wildcard=False, bindings=[_binding("uri x", "c2", 1, 100.0)])
    plan = plan_register(existing, other_call, 10, 100.0)  # expires == now: a removal
    assert plan.delete == ["uri x"] and plan.write == []
    many = RegisterRequest("a@d", "c2", 1, wildcard=False, bindings=[_binding("uri y", "c2", 1, 300.0)])
    assert plan_register(existing, many, 1, 100.0).status.reason == "too_many_contacts"
    wildcard = RegisterRequest("a@d", "c3", 1, wildcard=True)
    assert plan_register(existing, wildcard, 10, 100.0).delete == ["uri x"]


def test_user_names_are_user_at_domain() -> None:
    assert split_aor("Alice@SIP.Test") == ("Alice", "sip.test")
    for bad in ("alice", "@sip.test", "alice@", "a b@c", "a@b@c", "é@x"):
        with pytest.raises(UserError):
            split_aor(bad)


def test_route_tokens_are_bound_to_their_dialog() -> None:
    tokens = FlowTokens(b"k" * 32)
    token = tokens.route_token(42, "call-a")
    assert tokens.verified_route(token, "call-a") == 42
    assert tokens.verified_route(token, "call-b") is None
    assert tokens.verified_route(token.replace("42.", "43."), "call-a") is None
    assert tokens.verified_route(tokens.route_token(0, "call-a"), "call-a") == 0


def test_the_connections_closed_record_round_trips_in_batches() -> None:
    ids = list(range(1, MAX_CLOSED_PER_RECORD + 3))
    records = RecordReader().feed(encode_connections_closed(ids))
    assert [len(r.conn_ids) for r in records if isinstance(r, ConnectionsClosedRecord)] == [MAX_CLOSED_PER_RECORD, 2]
    assert [i for r in records if isinstance(r, ConnectionsClosedRecord) for i in r.conn_ids] == ids
    with pytest.raises(WireError):
        RecordReader().feed(b"\x07\x00\x00\x00\x03abc")
