"""``sipwire run`` supervises its console child: restarts it with back-off, stops it, never leaves a zombie."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipwire.cli import build_parser
from tests.conftest import REPO, stop_process, wait_for

START_SECONDS = 20.0


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is a child nobody reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


class Run:
    def __init__(self, tmp_path: Path, listen: str = "127.0.0.1:0") -> None:
        self.log_path = tmp_path / "run.log"
        command = [sys.executable, "-m", "sipwire.cli", "run", "--tcp", "127.0.0.1:0", "--tls", "127.0.0.1:0"]
        command += ["--listen", listen, "--instance", "runtest", "--state-dir", str(tmp_path / "state")]
        command += ["--workers", "1", "--threads", "1"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "SIPWIRE_CONSOLE_TOKEN_FILE": str(tmp_path / "token")}
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def console_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"console started, pid (\d+)", self.log())]

    def wait_log(self, pattern: str, count: int = 1, timeout: float = START_SECONDS) -> None:
        wait_for(lambda: len(re.findall(pattern, self.log())) >= count, timeout, f"{pattern!r} x{count} in the log")


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    running = Run(tmp_path)
    yield running
    stop_process(running.process)


def test_a_console_that_dies_is_reaped_logged_and_restarted(run: Run) -> None:
    run.wait_log(r"console listening on http://")
    [first] = run.console_pids()
    os.kill(first, signal.SIGKILL)
    run.wait_log(rf"console \(pid {first}\) stopped unexpectedly: killed by SIGKILL; starting it again in 1s")
    run.wait_log(r"console listening on http://", count=2)
    second = run.console_pids()[-1]
    assert second != first
    assert not _running(first)  # reaped at once, no zombie
    assert _running(second)
    assert stop_process(run.process) == 0
    assert not _running(second)
    assert "the transport stopped: stopping the console" in run.log()


def test_the_console_stops_by_itself_when_run_is_killed(run: Run) -> None:
    run.wait_log(r"console listening on http://")
    [console] = run.console_pids()
    run.process.kill()
    run.process.wait()
    wait_for(lambda: not _running(console), 10.0, "the console to notice its parent is gone")


def test_a_console_that_cannot_start_is_retried_with_back_off(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = Run(tmp_path, listen=f"127.0.0.1:{port}")
        try:
            run.wait_log(r"cannot start the console: cannot listen on 127\.0\.0\.1:\d+")
            run.wait_log(r"stopped unexpectedly: exit status 1; starting it again in 1s")
            run.wait_log(r"stopped unexpectedly: exit status 1; starting it again in 2s", timeout=10.0)
            assert run.process.poll() is None  # the transport runs on, and says why the console is missing
            pids = run.console_pids()
            assert len(pids) >= 2
            assert not any(_running(pid) for pid in pids[:-1])
        finally:
            assert stop_process(run.process) == 0
    assert not any(_running(pid) for pid in run.console_pids())


def test_a_reader_that_goes_away_gets_no_traceback() -> None:
    """``sipwire config | head -1``: the pipe closes early; the command ends quietly."""
    with subprocess.Popen(
        [sys.executable, "-m", "sipwire.cli", "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline()
        process.stdout.close()
        errors = process.stderr.read()
        assert process.wait(10) == 0
    assert b"Traceback" not in errors and b"BrokenPipeError" not in errors


def _commands(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield " ".join(("sipwire", *words)), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*words, name))


def test_every_command_and_option_has_help() -> None:
    missing = []
    for command, parser in _commands(build_parser()):
        if not parser.description:
            missing.append(f"{command}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.help is None or (action.help != argparse.SUPPRESS and not action.help.strip()):
                missing.append(f"{command} {action.dest}: no help")
    assert missing == []
