"""The console's access guard: Host allow-list (DNS rebinding), reads behind the token off loopback, OTLP senders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from sipwire.config import Settings
from sipwire.console.auth import Auth
from sipwire.console.guard import AccessGuard, AccessPolicy, host_of
from tests.conftest import RunningTransport
from tests.console_process import RunningConsole, console_starter

TOKEN = "a-long-enough-admin-token-for-tests"


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[Callable[..., RunningConsole]]:
    yield from console_starter(tmp_path)


def test_a_rebinding_host_is_refused_and_loopback_names_pass(
    start_transport: Callable[..., RunningTransport], start_console: Callable[..., RunningConsole]
) -> None:
    console = start_console(start_transport(workers=1))
    port = console.url.rpartition(":")[2]
    with console.client() as client:
        refused = client.get("/api/connections", headers={"Host": f"evil.example:{port}"})
        assert refused.status_code == 400
        assert "console_allowed_hosts" in refused.json()["detail"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
            assert client.get("/api/connections", headers={"Host": host}).status_code == 200
        assert client.get("/", headers={"Host": "evil.example"}).status_code == 400


def test_beyond_loopback_every_read_needs_the_token_but_health_and_metrics(
    start_transport: Callable[..., RunningTransport], start_console: Callable[..., RunningConsole]
) -> None:
    # 0.0.0.0 is not loopback, so the console guards its reads; the test still talks to it over 127.0.0.1.
    console = start_console(start_transport(workers=1), extra_args=("--listen", "0.0.0.0:0"))
    url = console.url
    with httpx.Client(base_url=url, timeout=10.0) as anonymous:
        for path in ("/api/stats", "/api/connections", "/api/threads", "/api/traces", "/docs", "/openapi.json"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert "Authorization: Bearer" in response.json()["detail"]
        page = anonymous.get("/connections", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/connections"
        assert anonymous.get("/api/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
        assert anonymous.get("/login").status_code == 200
        login = anonymous.post("/login", data={"token": console.token, "next": "/connections"})
        assert login.status_code == 303
        assert anonymous.get("/connections").status_code == 200  # the session cookie opens the pages
    with httpx.Client(base_url=url, timeout=10.0, headers={"Authorization": f"Bearer {console.token}"}) as admin:
        assert admin.get("/api/stats").status_code == 200


def _request(path: str, client: str, host: str = "127.0.0.1:8080", headers: dict[str, str] | None = None) -> Request:
    raw = [(b"host", host.encode())] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": path, "headers": raw, "client": (client, 40000)})


def test_the_otlp_receiver_takes_loopback_senders_or_the_token() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not called")

    guard = AccessGuard(app, Auth(TOKEN), AccessPolicy.from_settings(Settings()))
    assert guard._refusal(_request("/v1/traces", "127.0.0.1")) is None
    assert guard._refusal(_request("/v1/traces", "::1")) is None
    refused = guard._refusal(_request("/v1/traces", "192.0.2.10"))
    assert refused is not None and refused[0] == 401
    token = {"Authorization": f"Bearer {TOKEN}"}
    assert guard._refusal(_request("/v1/traces", "192.0.2.10", headers=token)) is None


def test_policy_from_settings() -> None:
    loopback = AccessPolicy.from_settings(Settings())
    assert not loopback.reads_need_token
    assert loopback.allowed_hosts == {"localhost", "127.0.0.1", "::1"}
    listening = AccessPolicy.from_settings(Settings(console_listen="192.0.2.5:8080"))
    assert listening.reads_need_token and "192.0.2.5" in listening.allowed_hosts
    anywhere = AccessPolicy.from_settings(Settings(console_allowed_hosts="*", console_listen="0.0.0.0:8080"))
    assert anywhere.allowed_hosts == frozenset()
    named = AccessPolicy.from_settings(Settings(console_allowed_hosts="Console.Example, 10.0.0.5"))
    assert named.allowed_hosts == {"console.example", "10.0.0.5"}
    assert host_of("[::1]:8080") == "::1" and host_of("Example.test:80") == "example.test" and host_of("::1") == "::1"
