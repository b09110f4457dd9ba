"""The call-flow view in Chromium (Playwright): real sipp calls, the ladder, a message, its trace, the pcap in tshark.

Two calls, each through its own transport with tracing on and its OTLP
endpoint pointed at its console (started first, so the spans have somewhere
to go): sipp's INVITE/ACK/BYE against the ``responder`` router, and a call
through the ``proxy`` router (``--open-registrar``) to a sipp UAS reached as
its upstream. In the browser: ``/calls`` finds each call by its Call-ID, the
ladder shows every message in carried order, a message opens with its full
text, its trace link leads to the trace, and the pcap the page offers is
dissected by tshark. Screenshots (``tests/artifacts/console/calls.png``,
``call-ladder.png``, ``call-ladder-proxied.png``, ``call-message.png``) are what the README shows.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import test_console_browser
from tests.conftest import RunningTransport
from tests.console_process import RunningConsole, console_starter, traces_to
from tests.sipp import SIPP, Sipp, run_sipp
from tests.test_console_browser import CHROMIUM, _shot
from tests.tshark import dissect, require_tshark

#: The console browser tests' Chromium and page fixtures (one browser per module, a fresh page per test).
browser = test_console_browser.browser
page = test_console_browser.page

pytestmark = [
    pytest.mark.sipp,
    pytest.mark.skipif(
        SIPP is None or not CHROMIUM.exists() or shutil.which("chromium") is None,
        reason="needs sipp and Debian's chromium (scripts/install-and-test.sh installs them)",
    ),
]

#: Spans leave the transport in batches every 100 ms; a trace page may need a few reloads to show them.
TRACE_WAIT_MS = 10_000


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[Callable[..., RunningConsole]]:
    yield from console_starter(tmp_path)


def _traced(start_transport: Any, start_console: Any, tmp_path: Path, *args: str, **settings: Any) -> tuple[
    RunningTransport, RunningConsole
]:  # fmt: skip
    """A console for the next transport's instance, then that transport, exporting every trace to the console."""
    console = start_console(instance="test0", state_dir=tmp_path / "state0")
    transport = start_transport(*args, env=traces_to(console), **settings)
    assert transport.control_path.parent.name == "test0"
    return transport, console


def _uac(transport: RunningTransport, workdir: Path, call_id_format: str) -> None:
    result = run_sipp(
        transport.host, transport.port, workdir, scenario="uac", transport="t1", calls=1, rate=1, timeout=20,
        extra_args=["-cid_str", call_id_format, "-s", "bob"],
    )  # fmt: skip
    assert (result.returncode, result.successful, result.failed) == (0, 1, 0), result.describe()


def _open_ladder(page: Any, console: RunningConsole, call_id: str, shot: str) -> list[str]:
    """Search /calls for the Call-ID, open its ladder; the arrows' labels in order."""
    page.goto(console.url + "/calls")
    page.get_by_test_id("search-call-id").fill(call_id)
    page.get_by_role("button", name="Search").click()
    row = page.locator(f'[data-testid="call-row"][data-call-id="{call_id}"]')
    row.wait_for()
    assert page.get_by_test_id("call-row").count() == 1  # the search left only this call
    if shot == "call-ladder":
        _shot(page, "calls")
    row.get_by_role("link", name=call_id).click()
    page.get_by_test_id("ladder").wait_for()
    assert page.get_by_test_id("call-id").inner_text() == call_id
    _shot(page, shot)
    return [label.strip() for label in page.get_by_test_id("arrow").all_inner_texts()]


def _message_and_trace(page: Any, console: RunningConsole, first_line: str) -> None:
    """Open the first arrow: its full text, then its trace link leads to that trace's waterfall."""
    page.get_by_test_id("ladder-row").first.locator("summary").click()
    message = page.get_by_test_id("message").first
    assert message.get_by_test_id("message-text").inner_text().startswith(first_line)
    _shot(page, "call-message")
    link = message.get_by_test_id("trace-link")
    href = link.get_attribute("href")
    assert href is not None and href.startswith("/traces/")
    link.click()
    page.wait_for_url(console.url + href)
    for _ in range(TRACE_WAIT_MS // 250):
        if page.get_by_test_id("waterfall").count():
            break
        page.wait_for_timeout(250)
        page.reload()
    page.get_by_test_id("waterfall").wait_for()
    assert "sip.receive" in page.get_by_test_id("waterfall").inner_text()
    page.go_back()
    page.get_by_test_id("ladder").wait_for()


def _pcap(page: Any, *sip_ports: int) -> list[tuple[str | int, str]]:
    with page.expect_download() as download:
        page.get_by_test_id("pcap-link").click()
    data = Path(download.value.path()).read_bytes()
    require_tshark()  # a skip without tshark, a failure in CI
    return [(row.method or row.status, row.call_id) for row in dissect(data, *sip_ports)]


def test_a_responder_call_in_the_browser(start_transport, start_console, page: Any, tmp_path: Path) -> None:
    transport, console = _traced(start_transport, start_console, tmp_path, workers=1)
    call_id = "ladder/1@browser.test"
    page.goto(console.url + "/calls")  # open before the call: the list polls, the call appears by itself
    assert page.get_by_test_id("call-row").count() == 0
    _uac(transport, tmp_path / "uac", "ladder/%u@browser.test")
    page.locator(f'[data-testid="call-row"][data-call-id="{call_id}"]').wait_for()
    assert _open_ladder(page, console, call_id, "call-ladder") == ["INVITE", "200 OK", "ACK", "BYE", "200 OK"]
    assert page.get_by_test_id("participant").count() == 2  # sipp, sipwire
    _message_and_trace(page, console, "INVITE sip:bob@")
    assert _pcap(page, transport.port) == [(kind, call_id) for kind in ("INVITE", 200, "ACK", "BYE", 200)]


def test_a_proxied_call_in_the_browser(start_transport, start_console, page: Any, tmp_path: Path) -> None:
    with Sipp("127.0.0.1", 9, tmp_path / "uas", scenario="uas", transport="t1", calls=1, rate=1,
              timeout=40) as uas:  # fmt: skip
        uas_port = int(uas.command[uas.command.index("-p") + 1])
        transport, console = _traced(
            start_transport, start_console, tmp_path, "--open-registrar", router="proxy", workers=2,
            upstream=f"sip:127.0.0.1:{uas_port};transport=tcp",
        )  # fmt: skip
        _uac(transport, tmp_path / "uac", "proxied/%u@browser.test")
        uas_result = uas.wait()
    assert (uas_result.successful, uas_result.failed) == (1, 0), uas_result.describe()
    call_id = "proxied/1@browser.test"
    # Each message arrives from one side and leaves to the other: sipp caller, sipwire, sipp callee. The
    # callee's 180 and 200 may both arrive before the 180 leaves (one read): the ladder shows the order carried.
    hops = ["INVITE", "INVITE", "180 Ringing", "180 Ringing", "200 OK", "200 OK", "ACK", "ACK", "BYE", "BYE"]
    hops += ["200 OK", "200 OK"]
    carried = _open_ladder(page, console, call_id, "call-ladder-proxied")
    assert sorted(carried) == sorted(hops) and carried[:2] == ["INVITE", "INVITE"], carried
    assert carried[-2:] == ["200 OK", "200 OK"] and sorted(carried[6:10]) == ["ACK", "ACK", "BYE", "BYE"], carried
    assert carried.index("180 Ringing") < carried.index("200 OK") and carried.index("ACK") < carried.index("BYE")
    assert page.get_by_test_id("participant").count() == 3
    participants = page.get_by_test_id("participant").all_inner_texts()
    assert f"127.0.0.1:{uas_port}" in participants[2]
    _message_and_trace(page, console, "INVITE sip:bob@")
    kinds = [int(hop.split()[0]) if hop[0].isdigit() else hop for hop in carried]  # the pcap keeps the ladder's order
    assert _pcap(page, transport.port, uas_port) == [(kind, call_id) for kind in kinds]


def test_the_list_polls_only_while_the_tab_is_visible(start_transport, start_console, page: Any) -> None:
    """A hidden /calls tab must not make the transport summarize its ring every 2 s."""
    console = start_console(start_transport(workers=1))
    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url) if "/api/calls" in request.url else None)
    page.goto(console.url + "/calls")
    page.wait_for_timeout(2600)
    assert polls, "the visible list did not poll"
    page.evaluate("Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'hidden'})")
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    page.wait_for_timeout(300)
    hidden_since = len(polls)
    page.wait_for_timeout(4500)  # two polling periods
    assert len(polls) == hidden_since, "the hidden list kept polling"
    page.evaluate("Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'visible'})")
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    page.wait_for_timeout(1000)
    assert len(polls) > hidden_since, "coming back did not refresh the list at once"
