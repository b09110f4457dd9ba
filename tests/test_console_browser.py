"""The console's pages in a real headless browser: Debian's chromium driven by Playwright for Python.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium``
(Debian package ``chromium``, installed by scripts/install-and-test.sh)
through ``executable_path``. Without it these tests are skipped with that
reason. Screenshots land in ``tests/artifacts/console/`` (ignored by git).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, RunningTransport, SipClient, sip_request, wait_for
from tests.console_process import RunningConsole, console_starter

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "artifacts" / "console"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
#: Longest a page may take to show a change (the target is 2 s; CI machines are slower).
LIVE_TIMEOUT_MS = 8000
#: Upper bound of the traffic generator's run, whatever the test does.
TRAFFIC_MAX_SECONDS = 60.0

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() or shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium); scripts/install-and-test.sh installs it",
)


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[Callable[..., RunningConsole]]:
    yield from console_starter(tmp_path)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    opened.set_default_timeout(LIVE_TIMEOUT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


class Traffic:
    """OPTIONS requests on ``count`` connections, one after another, until stopped (bounded in time)."""

    def __init__(self, transport: RunningTransport, count: int, pause: float = 0.002) -> None:
        self.clients = [SipClient.connect(transport) for _ in range(count)]
        self.pause = pause
        self.sent = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + TRAFFIC_MAX_SECONDS
        cseq = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                for client in self.clients:
                    cseq += 1
                    client.send(sip_request("OPTIONS", cseq, call_id=f"browser-{client.local_port}"))
                    assert client.read_response().status == 200
                    self.sent += 1
                time.sleep(self.pause)
        except BaseException as error:  # reported by stop()
            self.failure = error

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for client in self.clients:
            client.close()
        if self.failure is not None and exc_info[0] is None:
            raise AssertionError(f"traffic generator failed: {self.failure!r}")


def _number(page: Any, test_id: str) -> float:
    text = page.get_by_test_id(test_id).inner_text()
    match = re.search(r"-?\d+(\.\d+)?", text)
    assert match, f"no number in {test_id}: {text!r}"
    return float(match.group(0))


def _login(page: Any, url: str, token: str, next_path: str) -> None:
    page.goto(f"{url}/login?next={next_path}")
    page.get_by_test_id("token").fill(token)
    page.get_by_test_id("login-submit").click()
    page.wait_for_url(f"{url}{next_path}")


def test_overview_shows_live_figures_that_move_with_traffic(start_transport, start_console, page: Any) -> None:
    transport = start_transport()
    console = start_console(transport)
    page.goto(console.url + "/")
    page.get_by_test_id("status").filter(has_text="transport up").wait_for()
    assert page.get_by_test_id("listen-tcp").inner_text() == f"127.0.0.1:{transport.port}"
    assert _number(page, "connections") == 0
    with Traffic(transport, 4) as traffic:
        page.wait_for_function(
            "() => document.querySelector('[data-testid=connections]').innerText.trim().startsWith('4')"
        )
        page.wait_for_function("() => parseFloat(document.querySelector('[data-testid=messages-rate]').innerText) > 0")
        first = page.get_by_test_id("errors-total").inner_text()
        seen = {page.get_by_test_id("messages-rate").inner_text()}
        deadline = time.monotonic() + LIVE_TIMEOUT_MS / 1000
        while len(seen) < 3 and time.monotonic() < deadline:  # the rate is re-read every second
            page.wait_for_timeout(500)
            seen.add(page.get_by_test_id("messages-rate").inner_text())
        assert len(seen) >= 2, f"the message rate never changed: {seen}"
        assert first == "0"
        page.get_by_test_id("connections-tcp").filter(has_text="4").wait_for()
        assert page.get_by_test_id("thread-0").is_visible()
        assert page.locator("[data-testid=spark-messages] polyline").get_attribute("points")
        for stage in ("read_framed_ms", "queue_wait_ms", "routing_ms", "write_latency_ms"):  # where the time goes
            row = page.get_by_test_id(f"stage-{stage}")
            row.wait_for()
            assert int(row.locator("td").nth(2).inner_text()) > 0, row.inner_text()
        _shot(page, "overview-traffic")
        assert traffic.sent > 0
    page.wait_for_function("() => document.querySelector('[data-testid=connections]').innerText.trim().startsWith('0')")


def test_connections_table_lists_the_clients_and_filters(start_transport, start_console, page: Any) -> None:
    transport = start_transport()
    console = start_console(transport)
    clients = [SipClient.connect(transport) for _ in range(5)]
    try:
        for cseq, client in enumerate(clients, 1):
            client.send(sip_request("OPTIONS", cseq, call_id=f"table-{cseq}"))
            assert client.read_response().status == 200
        page.goto(console.url + "/connections")
        rows = page.get_by_test_id("conn-row")
        rows.nth(4).wait_for()
        remotes = {rows.nth(i).get_attribute("data-remote") for i in range(rows.count())}
        assert remotes == {f"127.0.0.1:{c.local_port}" for c in clients}
        assert "5 connections" in page.get_by_test_id("conn-total").inner_text()
        _shot(page, "connections")
        wanted = f"127.0.0.1:{clients[2].local_port}"
        page.locator("#q").fill(str(clients[2].local_port))
        page.wait_for_function("() => document.querySelectorAll('[data-testid=conn-row]').length === 1")
        assert rows.first.get_attribute("data-remote") == wanted
        page.locator("#q").fill("")
        page.wait_for_function("() => document.querySelectorAll('[data-testid=conn-row]').length === 5")
        page.get_by_role("button", name="age", exact=True).click()  # sort by age
        page.wait_for_function("() => document.querySelector('input[name=sort]').value === 'age'")
        page.locator("select[name=proto]").select_option("tls")
        page.wait_for_function("() => document.querySelectorAll('[data-testid=conn-row]').length === 0")
        page.locator("select[name=proto]").select_option("")
        rows.nth(4).wait_for()
        rows.filter(has_text=wanted).get_by_role("link").click()
        page.get_by_test_id("detail").filter(has_text=wanted).wait_for()
        _shot(page, "connection-detail")
    finally:
        for client in clients:
            client.close()


def test_login_then_resize_and_close_from_the_pages(start_transport, start_console, page: Any) -> None:
    transport = start_transport(env={"SIPWIRE_MAX_THREADS": "8"})
    console = start_console(transport)
    page.goto(console.url + "/threads")
    page.get_by_test_id("resize-login").wait_for()
    assert page.get_by_test_id("resize-form").count() == 0
    _login(page, console.url, console.token, "/threads")
    cookies = page.context.cookies()
    session = next(c for c in cookies if c["name"] == "sipwire_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    page.get_by_test_id("resize-size").fill("5")
    page.get_by_test_id("resize-submit").click()
    page.get_by_test_id("notice").filter(has_text="resized to 5").wait_for()
    page.get_by_test_id("pool-size").filter(has_text="5").wait_for()
    assert page.get_by_test_id("thread-row").count() == 5
    assert transport.control("threads")["size"] == 5
    _shot(page, "threads-resized")
    page.get_by_test_id("resize-size").fill("0")
    page.get_by_test_id("resize-submit").click()  # the browser's own min=1 check stops it: nothing is sent
    assert transport.control("threads")["size"] == 5

    page.goto(console.url + "/")  # the overview follows the resize within the poll interval
    page.wait_for_function("() => document.querySelectorAll('[data-testid^=thread-]').length === 5")

    with SipClient.connect(transport) as client:
        client.send(sip_request("OPTIONS", 1, call_id="close-me"))
        assert client.read_response().status == 200
        remote = f"127.0.0.1:{client.local_port}"

        def listed_id() -> int | None:  # the list comes from the stats block: a few updates a second
            listed = httpx.get(f"{console.url}/api/connections").json()["connections"]
            return next((c["id"] for c in listed if c["remote"] == remote), None)

        conn_id = wait_for(listed_id, what=f"connection from {remote} in the list")
        page.goto(f"{console.url}/connections/{conn_id}")
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_test_id("close").click()
        page.get_by_test_id("closed").wait_for()
        client.read_until_closed()
        _shot(page, "connection-closed")


def test_traces_page_shows_a_posted_trace_as_a_waterfall(start_transport, start_console, page: Any) -> None:
    transport = start_transport()
    console = start_console(transport, env={"SIPWIRE_CONSOLE_JAEGER_URL": "http://127.0.0.1:16686"})
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    spans = [
        ("00f067aa0ba902b7", "", "sip.receive", "sipwire-transport", 0, 900_000),
        ("00f067aa0ba902b8", "00f067aa0ba902b7", "sip.route", "sipwire-worker", 200_000, 600_000),
        ("00f067aa0ba902b9", "00f067aa0ba902b8", "sip.write", "sipwire-transport", 650_000, 850_000),
    ]
    start = time.time_ns()
    export = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "parentSpanId": parent,
                                "name": name,
                                "kind": 2,
                                "startTimeUnixNano": str(start + begin),
                                "endTimeUnixNano": str(start + end),
                                "attributes": [{"key": "sip.method", "value": {"stringValue": "OPTIONS"}}],
                            }
                        ]
                    }
                ],
            }
            for span_id, parent, name, service, begin, end in spans
        ]
    }
    page.goto(console.url + "/traces")
    answer = httpx.post(
        f"{console.url}/v1/traces", content=json.dumps(export), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 200
    row = page.get_by_test_id("trace-row").filter(has_text="sip.receive")
    row.wait_for()  # the list polls: no reload
    assert "3 of 30000 spans" in page.get_by_test_id("traces-held").inner_text()
    assert "fast 0 traces (0 spans)" in page.get_by_test_id("traces-evicted").inner_text()
    _shot(page, "traces")
    row.get_by_role("link", name="sip.receive").click()
    page.get_by_test_id("waterfall").wait_for()
    names = [page.get_by_test_id("span-row").nth(i).locator("strong").inner_text() for i in range(3)]
    assert names == ["sip.receive", "sip.route", "sip.write"]
    assert page.get_by_test_id("jaeger-link").get_attribute("href") == f"http://127.0.0.1:16686/trace/{trace_id}"
    _shot(page, "trace-waterfall")
    assert transport.process.poll() is None
