#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it:
# Debian packages (sipp as the real SIP peer, baresip as a real phone, stunnel to put TLS under it, chromium for
# the console's browser tests, tshark to decode the call-flow pcap export, python3-venv, Node.js/npm for the
# console's browser assets), the npm packages, a virtual environment .venv with the Python package and its test
# extras, the linters, and pytest (arguments go to pytest).
# Run as root or with sudo available. Nothing is installed into the system's Python: Debian's /usr/bin/python3
# is externally managed (PEP 668) and refuses a plain `pip install`.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v dpkg >/dev/null 2>&1; then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  DEBIAN_PACKAGES=(sip-tester stunnel4 chromium python3-venv baresip tshark)
  command -v npm >/dev/null 2>&1 || DEBIAN_PACKAGES+=(nodejs npm)
  missing=()
  for package in "${DEBIAN_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    # tshark's wireshark-common asks whether non-root users may capture: answer no, never prompt (the tests
    # only read pcap files).
    echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
else
  echo "install-and-test: not Debian; install sipp, stunnel4, chromium, tshark, Node.js and npm yourself" >&2
fi

npm ci --no-audit --no-fund  # htmx and Swagger UI, exactly as package-lock.json pins them, copied to console/static/

# The venv: built with Debian's own /usr/bin/python3 when it is 3.11 or newer (what the README's
# `python3 -m venv .venv` uses on Debian), else python3 from PATH; PYTHON=/path/to/python chooses another.
# An existing .venv is kept unless its Python is missing or older than 3.11.
at_least_311() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
if [[ -z ${PYTHON:-} ]]; then
  if at_least_311 /usr/bin/python3; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
if ! at_least_311 .venv/bin/python; then
  "$PYTHON" -m venv --clear .venv
fi
echo "install-and-test: .venv runs $(.venv/bin/python -c 'import sys; print(sys._base_executable, sys.version.split()[0])')"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports  # layers and no import cycle: the contracts in pyproject.toml
.venv/bin/python -m pytest "$@"
