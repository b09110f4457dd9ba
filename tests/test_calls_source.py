"""The console's reads of the capture over a real control socket: a slow capture query is not a transport down.

The transport's first ``calls`` query summarizes the whole ring (seconds at 200,000 messages); the
server here is the real control server with a handler that takes that long, since filling a real
transport's ring that far would take minutes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sipwire.config import load
from sipwire.console import source as source_module
from sipwire.console.source import CaptureSlowError, TransportSource
from sipwire.transport.control import ControlServer


def test_a_slow_capture_query_fails_alone_and_leaves_the_transport_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source_module, "CAPTURE_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(source_module, "CONTROL_TIMEOUT_SECONDS", 0.2)

    def handle(request: dict[str, Any]) -> Any:
        if request["op"] == "calls":
            time.sleep(1.0)  # past the capture timeout too
        elif request["op"] == "call":
            time.sleep(0.3)  # past the ordinary timeout, within the capture's
            return None
        return {"pid": 4242}

    settings = load(overrides={"state_dir": str(tmp_path)})
    server = ControlServer(settings.control_path, handle)
    server.start()
    try:
        reader = TransportSource(settings, use_stats_block=False)
        reader._control("health")
        assert reader.liveness().up
        assert reader.call("c1") is None
        with pytest.raises(CaptureSlowError, match=r"capture took more than 0\.5 s"):
            reader.calls(limit=5)
        assert reader.liveness().up and reader.liveness().pid == 4242
    finally:
        server.close()
