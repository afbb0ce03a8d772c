#!/usr/bin/env bash
# Set everything up (with the dev extra), then run the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest "$@"
