"""The state directory and its private files resist another local user: symlinks, foreign owners, shared modes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sipwire.config import Settings
from sipwire.statedir import (
    StateDirError,
    instance_secret,
    private_directory,
    read_private,
    runtime_directory,
    write_private,
)
from tests.conftest import REPO

OTHER_UID = 4242  # a uid that is not ours: the tests run as root in CI, so they can chown to it


def test_a_new_directory_is_created_0700(tmp_path: Path) -> None:
    made = private_directory(tmp_path / "a" / "b")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateDirError, match="symbolic link"):
        private_directory(tmp_path / "state")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory to another uid")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    squatted = tmp_path / "sipwire-1000"
    squatted.mkdir(mode=0o700)
    os.chown(squatted, OTHER_UID, OTHER_UID)
    with pytest.raises(StateDirError, match=f"belongs to uid {OTHER_UID}"):
        private_directory(squatted)


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StateDirError, match="chmod go-w"):
        private_directory(shared)


def test_a_configured_sticky_base_is_accepted_but_the_instance_must_be_ours(tmp_path: Path) -> None:
    base = tmp_path / "tmp"
    base.mkdir()
    base.chmod(0o1777)
    settings = Settings(state_dir=str(base), instance="edge")
    assert runtime_directory(settings) == base / "edge"
    assert stat.S_IMODE((base / "edge").stat().st_mode) == 0o700


def test_private_files_are_0600_and_never_followed_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep me")
    (tmp_path / "token").symlink_to(target)
    with pytest.raises(OSError):
        write_private(tmp_path / "token", b"secret")
    with pytest.raises(OSError):
        read_private(tmp_path / "token")
    assert target.read_bytes() == b"keep me"
    write_private(tmp_path / "real", b"secret")
    assert stat.S_IMODE((tmp_path / "real").stat().st_mode) == 0o600


def test_an_instance_secret_is_made_once_and_shared(tmp_path: Path) -> None:
    program = (
        "import sys; from pathlib import Path; from sipwire.statedir import instance_secret; "
        "print(instance_secret(Path(sys.argv[1]), 'flow.key').hex())"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", program, str(tmp_path)], stdout=subprocess.PIPE, cwd=REPO)
        for _ in range(6)
    ]
    outputs = {process.communicate(timeout=30)[0] for process in processes}
    assert len(outputs) == 1  # six processes racing agree on one secret
    assert bytes.fromhex(outputs.pop().decode().strip()) == instance_secret(tmp_path, "flow.key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.key"]  # no temporary file left


def test_the_transport_refuses_a_planted_state_directory(tmp_path: Path) -> None:
    (tmp_path / "attacker").mkdir(mode=0o700)
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    (base / "edge").symlink_to(tmp_path / "attacker")
    result = subprocess.run(
        [sys.executable, "-m", "sipwire.cli", "transport", "--tcp", "127.0.0.1:0", "--tls", "127.0.0.1:0",
         "--state-dir", str(base), "--instance", "edge", "--workers", "1"],
        check=False, capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1
    assert "is a symbolic link" in result.stderr
    assert list((tmp_path / "attacker").iterdir()) == []  # no key, socket or token written there
