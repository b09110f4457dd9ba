#!/usr/bin/env bash
# Build sipwire's wheel into dist/ (or the folder given as $1). `npm ci` installs the npm packages pinned in
# package-lock.json and copies the files the console serves (htmx, Swagger UI) into console/static/; the wheel
# carries them as package data, so installing it needs no npm, no checkout and no network for the console.
# The build runs in .venv (created with python3 when missing): Debian's own python3 refuses pip outside one.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}

npm ci --no-audit --no-fund
if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
rm -rf build  # setuptools' staging folder: a file left there by an earlier build would end up in the wheel
.venv/bin/python -m pip wheel --no-deps --disable-pip-version-check -w "$out" .
rm -rf build
ls -l "$out"/sipwire-*.whl
