"""Settings layering (defaults < TOML < environment < flags), validation, generated docs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sipwire.cli import settings_reference
from sipwire.config import ConfigError, load

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_loopback_and_documented_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TCP", "THREADS", "MAX_CONNECTIONS"):
        monkeypatch.delenv(f"SIPWIRE_{name}", raising=False)
    settings = load()
    assert settings.tcp_address == ("127.0.0.1", 5060)
    assert settings.max_connections == 2048
    assert settings.max_message_bytes == 65536
    assert settings.message_timeout == 4.0
    assert settings.idle_timeout == 120.0
    assert settings.ws_address is None and settings.wss_address is None  # WebSocket listeners: off unless given


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sipwire.toml"
    config.write_text('threads = 3\nworkers = 2\ntcp = "127.0.0.2:5070"\nidle_timeout = 30\n')
    monkeypatch.setenv("SIPWIRE_WORKERS", "5")
    monkeypatch.setenv("SIPWIRE_IDLE_TIMEOUT", "12.5")
    settings = load(str(config), {"threads": 4, "router": None})
    assert settings.threads == 4  # flag beats file
    assert settings.workers == 5  # environment beats file
    assert settings.idle_timeout == 12.5
    assert settings.tcp_address == ("127.0.0.2", 5070)  # file beats default
    assert settings.router == "responder"  # an absent flag changes nothing


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"threads": 0}, "threads: 0 is outside 1..64"),
        ({"threads": 65}, "threads: 65 is outside 1..64"),
        ({"workers": "many"}, "workers: 'many' is not an integer"),
        ({"tcp": "localhost:5060"}, "host 'localhost'"),
        ({"tcp": "127.0.0.1:70000"}, "port 70000"),
        ({"tcp": "127.0.0.1"}, "is not HOST:PORT"),
        ({"max_message_bytes": 0}, "max_message_bytes: 0 must be positive"),
        ({"connect_timeout": -1}, "connect_timeout: -1.0 must be a positive number of seconds"),
        ({"max_header_bytes": 70000}, "max_header_bytes: 70000 exceeds max_message_bytes 65536"),
        ({"instance": "../x"}, "instance: '../x' must be a plain name"),
        ({"ws": "localhost:8088"}, "host 'localhost'"),
        ({"wss": "127.0.0.1"}, "wss: '127.0.0.1' is not HOST:PORT"),
        ({"ws_allowed_origins": "phone.example"}, "ws_allowed_origins: 'phone.example' is not an origin"),
        ({"ws_allowed_origins": "https://phone.example/"}, "'https://phone.example/' is not an origin like https"),
        ({"ws_max_frame_bytes": 0}, "ws_max_frame_bytes: 0 must be positive"),
        ({"ws_ping_interval": 0}, "ws_ping_interval: 0.0 must be a positive number of seconds"),
        ({"log_level": "loud"}, "log_level: 'loud'"),
        # Limits checked against each other: a message must fit every queue and a channel record.
        ({"max_message_bytes": 2 << 20}, "max_message_bytes: 2097152 exceeds 524288"),
        ({"write_queue_bytes": 1000}, "write_queue_bytes: 1000 is below max_message_bytes 65536"),
        ({"dispatch_backlog_bytes": 1000}, "dispatch_backlog_bytes: 1000 is below max_message_bytes 65536"),
        ({"global_write_queue_bytes": 100000}, "global_write_queue_bytes: 100000 is below write_queue_bytes 262144"),
        ({"dns_timeout": 0}, "dns_timeout: 0.0 must be a positive number of seconds"),
        ({"console_public_paths": "metrics"}, "console_public_paths: 'metrics' is not a path"),
    ],
)
def test_invalid_values_name_the_setting_and_value(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load(None, overrides)


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("treads = 3\n")
    with pytest.raises(ConfigError, match="unknown settings treads"):
        load(str(config))


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(str(tmp_path / "missing.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("threads = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load(str(broken))


def test_configuration_doc_is_generated_from_settings() -> None:
    doc = (REPO / "docs" / "CONFIGURATION.md").read_text()
    assert doc.strip() == settings_reference().strip(), "run: sipwire config --markdown > docs/CONFIGURATION.md"


def test_cli_reports_bad_configuration_with_exit_code_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sipwire.cli", "transport", "--threads", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "configuration error: threads: 0 is outside 1..64" in result.stderr


def test_workers_never_import_openssl() -> None:
    """SSL objects stay in the transport: a worker process must not even load OpenSSL."""
    code = (
        "import sys, transport.worker, transport.routers.proxy; print(sorted(m for m in sys.modules if 'OpenSSL' in m))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == "[]"
