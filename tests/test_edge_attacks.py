"""Attacks on sipwire's edge found by an adversarial review, each against a real transport and real workers.

Every test here failed on the code before its fix; the docstring of each says what the attack did.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.conftest import RunningTransport, SipClient, sip_request


@pytest.mark.parametrize(
    ("headers", "content_length"),
    [
        # A bare LF: a next hop that accepts LF line ends (many do) reads a second Content-Length, smuggled.
        ([("Subject", "hi\nContent-Length: 30")], "0"),
        # A bare CR, the same for CR-tolerant parsers.
        ([("Subject", "hi\rContent-Length: 30")], "0"),
        # A folded Content-Length: the framer reads 0, the copy forwarded said "0 25" and framed nowhere.
        ([], "0\r\n 25"),
    ],
    ids=["bare-lf", "bare-cr", "folded-content-length"],
)
def test_the_proxy_relays_no_header_that_frames_differently_at_the_next_hop(
    start_transport: Callable[..., RunningTransport], headers: list[tuple[str, str]], content_length: str
) -> None:
    """Header text the framer and the parser read one way left the proxy to be read another way by the next hop.

    The proxy copies header lines as parsed; a value holding a bare CR or LF, or a folded Content-Length,
    went upstream as it came, on a connection shared with other users' requests. Such a request is a 400 now.
    """
    upstream = socket.create_server(("127.0.0.1", 0))
    upstream.settimeout(0.5)
    proxy = start_transport(
        "--open-registrar", router="proxy", workers=1,
        upstream=f"sip:127.0.0.1:{upstream.getsockname()[1]};transport=tcp",
    )  # fmt: skip
    crafted = sip_request("OPTIONS", uri="sip:x@example.test", headers=headers, content_length=content_length)
    with upstream, SipClient.connect(proxy) as client:
        client.send(crafted)
        answer = client.read_response()
        assert answer.status == 400, answer.raw
        with pytest.raises(TimeoutError):
            upstream.accept()  # nothing was forwarded
