#!/usr/bin/env bash
# Longer atheris campaigns than the test suite's: each harness in fuzz/ for SECONDS (default 600) in turn.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      TARGET: framer, sip, wire (default: all three)
#
# Corpora grow in fuzz/work/<target>/corpus (git-ignored; seeded by the harness from tests/corpus) and are
# kept between campaigns; crash, timeout and leak inputs land in fuzz/work/<target>/. Replay one with
# `python fuzz/fuzz_<target>.py fuzz/work/<target>/crash-...`, then make it a regression test in
# tests/test_fuzz_regressions.py with its fix. Extra libFuzzer flags: FUZZ_FLAGS="-jobs=2 -workers=2" etc.
# Exits non-zero if any target found something.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-600}"
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then targets=(framer sip wire); fi
python="${PYTHON:-python3}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then python=.venv/bin/python; fi

failed=()
for target in "${targets[@]}"; do
  harness="fuzz/fuzz_${target}.py"
  if [[ ! -f "$harness" ]]; then
    echo "fuzz.sh: no harness $harness (targets: framer, sip, wire)" >&2
    exit 2
  fi
  work="fuzz/work/${target}"
  mkdir -p "$work/corpus"
  echo "== $target: ${seconds}s, corpus $work/corpus, log $work/fuzz.log"
  # shellcheck disable=SC2086  # FUZZ_FLAGS is a list of flags
  "$python" "$harness" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$work/" ${FUZZ_FLAGS:-} "$work/corpus" >"$work/fuzz.log" 2>&1
  status=$?
  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$work/fuzz.log" || true
  if [[ $status -ne 0 ]]; then
    failed+=("$target")
    echo "!! $target exited $status; last lines of $work/fuzz.log:"
    tail -n 40 "$work/fuzz.log"
    ls -1 "$work"/crash-* "$work"/timeout-* "$work"/oom-* "$work"/leak-* 2>/dev/null
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz.sh: findings in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: no findings"
