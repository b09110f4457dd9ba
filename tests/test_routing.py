"""``transport/routing.py`` helpers that every write job to a destination goes through."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from sipwire.transport.routing import is_ip_literal

_HOST_PARTS = st.sampled_from([*"0123456789abcdefx.:%[] ", "\x00", "255", "256", "01", "::", "ffff", "eth0", "é"])


def _by_ipaddress(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@settings(max_examples=1000)
@given(st.lists(_HOST_PARTS, max_size=16).map("".join))
def test_an_ip_literal_is_what_ipaddress_reads_as_one(host: str) -> None:
    assert is_ip_literal(host) == _by_ipaddress(host), repr(host)


def test_the_usual_hosts() -> None:
    assert is_ip_literal("127.0.0.1")
    assert is_ip_literal("::1")
    assert is_ip_literal("fe80::1%eth0")
    assert not is_ip_literal("[::1]")  # brackets belong to the URI, not the address
    assert not is_ip_literal("01.2.3.4")  # leading zeros: octal to some readers, refused by both
    assert not is_ip_literal("sip.example.com")
