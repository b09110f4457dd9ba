"""What the atheris harnesses share: seeding a corpus directory, the dictionaries, starting the fuzzer.

A harness (``fuzz/fuzz_<target>.py``) defines ``check(data)`` -- the invariants
for one input, raising ``AssertionError`` or letting an unexpected exception
escape when one breaks -- and ``seeds()``. Run as a script it instruments
``sipwire`` and hands ``check`` to :func:`run`; imported (by the tests) it is
plain Python, so a regression input can be replayed with ``check(data)``.

This module must not import ``sipwire``: the harness imports it before the
instrumented import of the code under test.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parent.parent
FUZZ_DIR = REPO / "fuzz"
SIP_CORPUS = REPO / "tests" / "corpus"


def sip_corpus() -> dict[str, bytes]:
    """The stream messages of tests/corpus (``ok_*`` and ``err_*``) by file name, sorted."""
    return {path.name: path.read_bytes() for path in sorted(SIP_CORPUS.glob("*.sip"))}


def enable_hooks() -> None:
    """Let atheris see comparisons inside ``re`` and ``str`` methods (call before importing the target)."""
    atheris.enabled_hooks.add("RegEx")
    atheris.enabled_hooks.add("str")


def _seed_directory(directory: Path, seeds: Iterable[bytes]) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for seed in seeds:
        path = directory / f"seed-{hashlib.sha1(seed).hexdigest()}"
        if not path.exists():
            path.write_bytes(seed)
            written += 1
    return written


def run(check: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]], dictionary: str | None) -> None:
    """libFuzzer's command line (``-max_total_time=N CORPUS_DIR...``, or crash files to replay).

    The first directory argument is seeded with ``seeds()`` (files ``seed-<sha1>``,
    written once) and created if missing; ``-dict=`` defaults to ``fuzz/<dictionary>``.
    """
    argv = list(sys.argv)
    paths = [argument for argument in argv[1:] if not argument.startswith("-")]
    if paths and (Path(paths[0]).is_dir() or not Path(paths[0]).exists()):
        written = _seed_directory(Path(paths[0]), seeds())
        print(f"fuzz: {written} new seed inputs in {paths[0]}", file=sys.stderr)
    if dictionary is not None and not any(argument.startswith("-dict=") for argument in argv):
        argv.append(f"-dict={FUZZ_DIR / dictionary}")
    atheris.Setup(argv, check)
    atheris.Fuzz()


def assert_own_parts(answer: bytes, status: int) -> None:
    """What a best-effort error answer writes itself is right: its status line and an empty body."""
    assert answer.startswith(b"SIP/2.0 %d " % status), answer
    assert answer.endswith(b"\r\nContent-Length: 0\r\n\r\n"), answer
