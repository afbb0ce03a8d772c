#!/usr/bin/env bash
# Set everything up (with the dev extra, and Debian's Chromium for the report's browser test),
# then run the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/browser.sh   # Debian's Chromium for the report's browser test
exec .venv/bin/python -m pytest "$@"
