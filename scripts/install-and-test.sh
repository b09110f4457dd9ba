#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it:
# Debian packages (sipp as the real SIP peer, stunnel to put TLS under it, chromium for the console's browser
# tests, Node.js/npm for the console's htmx), the npm packages, the Python package with its test extras, the
# linters, and pytest. Run as root or with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
DEBIAN_PACKAGES=(sip-tester stunnel4 chromium)
command -v npm >/dev/null 2>&1 || DEBIAN_PACKAGES+=(nodejs npm)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

npm ci --no-audit --no-fund  # htmx for the console, exactly as package-lock.json pins it
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy
python3 -m pytest "$@"
