#!/usr/bin/env bash
# Set everything up (with the dev extra, and Debian's Chromium for the report's browser test),
# then run the whole test suite, slow tests included, and the interop tests in their own
# environment (scripts/interop.sh). Extra arguments go to the main pytest run, e.g.
# scripts/test.sh -m "not slow"; QUANTLAB_SKIP_INTEROP=1 leaves the interop step out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/browser.sh   # Debian's Chromium for the report's browser test
if [ "${QUANTLAB_SKIP_INTEROP:-0}" = 1 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest --ignore=tests/test_interop.py "$@"
bash scripts/interop.sh
