"""Inputs the atheris harnesses (fuzz/) found, each with its fix, as plain tests.

Every test states the fixed behaviour directly; the fuzzer's own input is kept verbatim too, replayed
through the harness's ``check``.
"""

from __future__ import annotations

import pytest

from sipwire.transport.sipuri import SipUriError, parse_uri

# -- sipuri: str.isdigit() took non-ASCII digits, and int() then raised ValueError (not SipUriError) ------


@pytest.mark.parametrize(
    "uri",
    [
        "sip:bob@example.com:5060\u00b2",  # "²": isdigit() but int() refuses it
        "sip:bob@example.com:\u0665\u0660\u0666\u0660",  # Arabic-Indic "5060": int() read it as a port
        "sip:bob@example.com:\uff15\uff10\uff16\uff10",  # full-width "5060"
        "sip:bob@example.com:" + "1" * 5000,  # int() refuses more than 4300 digits
        "sip:bob@example.com:005060",
        "sip:bob@[2001:db8::1]5060",  # a port needs its colon after an IPv6 reference too
        "sip:bob@[2001:db8::1]::5060",
    ],
)
def test_ports_are_ascii_digits_or_the_uri_is_refused(uri: str) -> None:
    with pytest.raises(SipUriError, match=r"port|IPv6"):
        parse_uri(uri)


@pytest.mark.parametrize(
    ("uri", "host", "port"),
    [
        ("sip:bob@example.com:5060", "example.com", 5060),
        ("sips:bob@[2001:db8::1]:5061;transport=tls", "2001:db8::1", 5061),
        ("sip:[::1]", "::1", None),
        ("sip:[::1]:", "::1", None),
        ("sip:example.com:65535", "example.com", 65535),
        ("sip:example.com:01", "example.com", 1),
    ],
)
def test_valid_ports_still_parse(uri: str, host: str, port: int | None) -> None:
    parsed = parse_uri(uri)
    assert (parsed.host, parsed.port) == (host, port)
