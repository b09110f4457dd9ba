"""Coverage-guided fuzzing of the sans-IO parsers with atheris, bounded for the test suite.

Each harness in fuzz/ runs in a subprocess for ``SIPWIRE_FUZZ_SECONDS`` (default
20) on a fresh corpus it seeds from tests/corpus; the test fails on any crash,
timeout or memory blow-up and prints the input (repr and base64) with the
command that replays it. ``SIPWIRE_FUZZ_SEED`` fixes libFuzzer's seed (a failing
run prints the one it used). Longer campaigns: ``scripts/fuzz.sh``.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

FUZZ_SECONDS = int(os.environ.get("SIPWIRE_FUZZ_SECONDS", "20"))
TARGETS = ("framer", "sip", "wire")
#: A run that executed fewer inputs than this did not really fuzz (each target does thousands a second).
MIN_EXECUTIONS = 1000


def require_atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.fail("atheris is not installed; it is pinned in the test extra: pip install -e '.[test]'")


def describe_finding(path: Path) -> str:
    data = path.read_bytes()
    shown = repr(data) if len(data) <= 2000 else f"{data[:2000]!r}... ({len(data)} bytes)"
    return f"{path.name} ({len(data)} bytes):\n  {shown}\n  base64: {base64.b64encode(data).decode()}"


@pytest.mark.timeout(FUZZ_SECONDS + 120)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_harness_finds_nothing(target: str, tmp_path: Path) -> None:
    require_atheris()
    harness = REPO / "fuzz" / f"fuzz_{target}.py"
    command = [
        sys.executable, str(harness), f"-max_total_time={FUZZ_SECONDS}", "-timeout=10", "-rss_limit_mb=2048",
        "-print_final_stats=1", f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus"),
    ]  # fmt: skip
    if os.environ.get("SIPWIRE_FUZZ_SEED"):
        command.insert(2, f"-seed={os.environ['SIPWIRE_FUZZ_SEED']}")
    result = subprocess.run(command, capture_output=True, timeout=FUZZ_SECONDS + 90, cwd=REPO, check=False)
    stdout, stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    output = stdout + stderr
    findings = sorted(path for path in tmp_path.iterdir() if path.is_file())
    if result.returncode != 0 or findings:
        seed = re.search(r"INFO: Seed: (\d+)", output)
        lines = [
            f"fuzz/fuzz_{target}.py exited {result.returncode} after at most {FUZZ_SECONDS}s "
            f"(libFuzzer seed {seed.group(1) if seed else '?'})",
            *(describe_finding(path) for path in findings),
            *(f"replay: python fuzz/fuzz_{target}.py {path}" for path in findings),
            "--- stdout (the exception) ---",
            *stdout.splitlines()[-40:],
            "--- stderr (libFuzzer) ---",
            *stderr.splitlines()[-25:],
        ]
        pytest.fail("\n".join(lines), pytrace=False)
    executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    assert executed is not None, f"no final stats from the fuzzer:\n{output[-3000:]}"
    assert int(executed.group(1)) >= MIN_EXECUTIONS, f"only {executed.group(1)} inputs ran:\n{output[-3000:]}"


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_seeds_hold_the_invariants(target: str) -> None:
    """The harness's own seeds pass its checks (in process: a broken invariant shows here in a second)."""
    require_atheris()
    harness = importlib.import_module(f"fuzz.fuzz_{target}")
    seeds = harness.seeds()
    assert len(seeds) >= 10
    for seed in seeds:
        harness.check(seed)
