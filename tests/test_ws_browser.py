"""Interop with a browser SIP stack nobody here wrote: SIP.js in headless Chromium, through the proxy router.

SIP.js (pinned in package.json / package-lock.json, loaded from node_modules as
ES modules by a page this test serves itself; no CDN) registers over WSS, or
WS, with the ``proxy`` router, then exchanges MESSAGE requests with sipp on
TCP both ways: the browser to a sipp UAS (the proxy's upstream), and a sipp UAC
to the browser (over the browser's own WebSocket, found through its
registration). Both sides are checked: what the page saw and what sipp counted.
"""

from __future__ import annotations

import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, RunningTransport, wait_for
from tests.sipp import SIPP, Sipp, run_sipp

CHROMIUM = Path("/usr/bin/chromium")
PAGE = REPO / "tests" / "ws_browser" / "index.html"
SIPJS = REPO / "node_modules" / "sip.js" / "lib"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.skipif(
        not CHROMIUM.exists() or shutil.which("chromium") is None or SIPP is None,
        reason="needs Debian's chromium and sipp (scripts/install-and-test.sh installs both)",
    ),
    pytest.mark.skipif(not SIPJS.is_dir(), reason="SIP.js is not installed: run npm ci"),
]


class _PageHandler(http.server.BaseHTTPRequestHandler):
    """Serves the test page and SIP.js's modules, nothing else."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(PAGE, "text/html; charset=utf-8")
            return
        if path.startswith("/sip.js/"):
            target = (SIPJS / path.removeprefix("/sip.js/")).resolve()
            if target.is_relative_to(SIPJS.resolve()) and target.suffix == ".js" and target.is_file():
                self._send(target, "text/javascript; charset=utf-8")
                return
        self.send_error(404)

    def _send(self, file: Path, content_type: str) -> None:
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def page_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def page(page_url: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(ignore_https_errors=True)  # the transport's self-signed dev certificate
            opened = context.new_page()
            errors: list[str] = []
            opened.on("pageerror", lambda error: errors.append(str(error)))
            opened.goto(page_url)
            opened.wait_for_function("typeof window.register === 'function'", timeout=10_000)
            yield opened
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            browser.close()


@pytest.mark.parametrize("secure", [True, False], ids=["wss", "ws"])
def test_sipjs_registers_and_exchanges_messages_with_sipp(
    start_transport: Any, page: Any, tmp_path: Path, secure: bool
) -> None:
    with Sipp("127.0.0.1", 9, tmp_path / "uas", scenario="message_uas.xml", transport="t1", calls=1, rate=1,
              timeout=60) as uas:  # fmt: skip
        uas_port = int(uas.command[uas.command.index("-p") + 1])
        running: RunningTransport = start_transport(
            "--open-registrar",  # SIP.js registers without credentials here: a lab registrar
            workers=2, router="proxy", upstream=f"sip:127.0.0.1:{uas_port};transport=tcp",
            ws="127.0.0.1:0", wss="127.0.0.1:0",
        )  # fmt: skip
        server = f"wss://127.0.0.1:{running.wss_port}" if secure else f"ws://127.0.0.1:{running.ws_port}"
        try:
            assert page.evaluate("([s, u, d]) => window.register(s, u, d)", [server, "alice", "127.0.0.1"]) == (
                "Registered"
            )
            # The browser to sipp: MESSAGE over the WebSocket, forwarded upstream over TCP, 200 back.
            message = ["sip:bob@127.0.0.1", "hello from the browser"]
            assert page.evaluate("([t, b]) => window.sendMessage(t, b)", message) == 200
            uas_result = uas.wait()
        except BaseException:
            print(page.inner_text("#log")[-6000:])  # SIP.js's own trace of what it sent and received
            raise
    assert (uas_result.successful, uas_result.failed) == (1, 0), uas_result.describe()
    # sipp to the browser: MESSAGE to alice's address of record, delivered over her own WebSocket.
    uac_result = run_sipp(
        "127.0.0.1", running.port, tmp_path / "uac", scenario="message_uac.xml", transport="t1", calls=1, rate=1,
        timeout=30,
    )  # fmt: skip
    assert (uac_result.successful, uac_result.received(200)) == (1, 1), uac_result.describe()
    received = wait_for(lambda: page.evaluate("window.received"), what="the MESSAGE in the page")
    assert [item["body"] for item in received] == ["hello from sipp\r\n"]  # the body as sipp sent it
    [browser_conn] = [c for c in running.control("connections")["connections"] if c["transport"].startswith("ws")]
    assert browser_conn["transport"] == ("wss" if secure else "ws")
    assert browser_conn["messages_in"] >= 3  # REGISTER, MESSAGE, and the 200 to sipp's MESSAGE
    counters = running.counters()
    assert counters["ws_handshakes"] == 1 and counters.get("router_errors", 0) == 0
    assert "Traceback" not in running.log_text()


@pytest.mark.parametrize("secure", [True, False], ids=["wss", "ws"])
def test_sipjs_keeps_a_dialog_through_the_proxys_websocket_record_route(
    start_transport: Any, page: Any, tmp_path: Path, secure: bool
) -> None:
    """SIP.js subscribes to a sipp notifier through the proxy: the proxy record-routes the browser's leg
    ``transport=ws`` (RFC 7118), sipp's NOTIFYs follow that route set down the WebSocket with a ``WS``/``WSS``
    Via, and SIP.js's un-SUBSCRIBE follows the route set it learnt back to sipp."""
    with Sipp("127.0.0.1", 9, tmp_path / "uas", scenario="subscribe_uas.xml", transport="t1", calls=1, rate=1,
              timeout=60) as uas:  # fmt: skip
        uas_port = int(uas.command[uas.command.index("-p") + 1])
        running: RunningTransport = start_transport(
            "--open-registrar", workers=2, router="proxy", upstream=f"sip:127.0.0.1:{uas_port};transport=tcp",
            ws="127.0.0.1:0", wss="127.0.0.1:0",
        )  # fmt: skip
        name, port = ("WSS", running.wss_port) if secure else ("WS", running.ws_port)
        server = f"{name.lower()}://127.0.0.1:{port}"
        try:
            assert page.evaluate("([s, u, d]) => window.register(s, u, d)", [server, "alice", "127.0.0.1"]) == (
                "Registered"
            )
            via = page.evaluate("(t) => window.subscribe(t)", "sip:bob@127.0.0.1")
            assert via.startswith(f"SIP/2.0/{name} 127.0.0.1:{port};branch=z9hG4bKsw"), via
            assert page.evaluate("() => window.unsubscribe()") == "Terminated"
            uas_result = uas.wait()
        except BaseException:
            print(page.inner_text("#log")[-6000:])
            raise
    assert (uas_result.successful, uas_result.failed) == (1, 0), uas_result.describe()
    counters = running.counters()
    assert counters["proxy.record_routed"] == 1 and counters["proxy.in_dialog"] >= 3  # NOTIFY, SUBSCRIBE, NOTIFY
    assert counters.get("router_errors", 0) == 0 and counters.get("proxy.responses_dropped", 0) == 0
