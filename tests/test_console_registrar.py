"""The console's registrar views: GET /api/registrations, the Registrations page, the users admin API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningTransport, wait_for
from tests.console_process import RunningConsole, console_starter
from tests.sipphone import Phone

USERS = {"alice@sip.test": "alice-secret"}
INSTANCE = '"<urn:uuid:00000000-0000-1000-8000-00aa00bb00cc>"'


@pytest.fixture
def start_console(tmp_path: Path) -> Iterator[Callable[..., RunningConsole]]:
    yield from console_starter(tmp_path)


def test_registrations_are_listed_by_aor_with_their_flow(start_transport, start_console) -> None:
    proxy: RunningTransport = start_transport(router="proxy", workers=1, users=USERS)
    console = start_console(proxy)
    with Phone(proxy, "alice@sip.test", USERS["alice@sip.test"]) as alice:
        contact = f"<{alice.contact}>;+sip.instance={INSTANCE};reg-id=1"
        assert alice.register(contact, headers=[("User-Agent", "test-phone/1.0")]).status == 200
        with console.client() as http:
            listing = http.get("/api/registrations").json()
            [registration] = listing["registrations"]
            assert registration["aor"] == "alice@sip.test"
            [entry] = registration["contacts"]
            assert entry["contact"] == alice.contact
            assert entry["flow"] == "outbound" and entry["reg_id"] == 1
            assert entry["instance"] == "<urn:uuid:00000000-0000-1000-8000-00aa00bb00cc>"
            assert entry["transport"] == "tcp" and entry["user_agent"] == "test-phone/1.0"
            assert 3590 <= entry["expires"] <= 3600
            page = http.get("/registrations")
            assert page.status_code == 200 and alice.contact in page.text and "test-phone/1.0" in page.text
            assert "user-row" not in page.text  # users are for the admin
    with console.client() as http:
        wait_for(lambda: http.get("/api/registrations").json() == {"registrations": []}, what="the flow removed")


def test_users_are_managed_by_the_admin_only_and_never_shown_with_secrets(start_transport, start_console) -> None:
    proxy: RunningTransport = start_transport(router="proxy", workers=1, users=USERS)
    console = start_console(proxy)
    with console.client() as anonymous:
        assert anonymous.get("/api/users").status_code == 401
        assert anonymous.put("/api/users/bob@sip.test", json={"password": "bob-secret"}).status_code == 401
    with console.client(authorized=True) as admin:
        assert [u["aor"] for u in admin.get("/api/users").json()["users"]] == ["alice@sip.test"]
        added = admin.put("/api/users/bob@sip.test", json={"password": "bob-secret"})
        assert added.status_code == 200, added.text
        assert [u["aor"] for u in added.json()["users"]] == ["alice@sip.test", "bob@sip.test"]
        assert "secret" not in added.text and "ha1" not in added.text
        assert admin.put("/api/users/bob@sip.test", json={"password": "short"}).status_code == 422
        assert admin.put("/api/users/not-an-aor", json={"password": "long-enough"}).status_code == 422
        page = admin.get("/registrations")
        assert page.text.count('data-testid="user-row"') == 2
    with Phone(proxy, "bob@sip.test", "bob-secret") as bob:  # the proxy's workers see the new user at once
        assert bob.register().status == 200
    with console.client(authorized=True) as admin:
        assert admin.delete("/api/users/bob@sip.test").status_code == 200
        assert admin.delete("/api/users/bob@sip.test").status_code == 404
        assert admin.get("/api/registrations").json() == {"registrations": []}  # its bindings went with it
