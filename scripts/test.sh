#!/usr/bin/env bash
# Set everything up (with the dev extra, Debian's Chromium for the report's browser test, and
# llama.cpp's tools built from PyPI's llama-cpp-python sdist, and .venv-vllm for the engine tests),
# then run the whole test suite, slow tests included, and the interop tests in their own
# environment (scripts/interop.sh). Extra arguments go to the main pytest run, e.g.
# scripts/test.sh -m "not slow"; QUANTLAB_SKIP_INTEROP=1 leaves the interop step out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/browser.sh   # Debian's Chromium for the report's browser test
bash scripts/llamacpp.sh >/dev/null   # llama.cpp's tools for the engine tests (built once, cached)
bash scripts/vllm.sh   # vLLM's own environment for tests/test_vllm.py (built once, ~1.5 min; then instant)
if [ "${QUANTLAB_SKIP_INTEROP:-0}" = 1 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest --ignore=tests/test_interop.py "$@"
bash scripts/interop.sh
