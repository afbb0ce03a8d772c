#!/usr/bin/env bash
# The interop tests (tests/test_interop.py): quantlab's GPTQ and AWQ checkpoints loaded by
# transformers with gptqmodel's CPU kernels, an independent loader. gptqmodel pins numpy and
# compiles C at install, so it gets its own environment (.venv-gptq), apart from .venv.
# The tests run with QUANTLAB_REQUIRE_INTEROP=1: here a missing gptqmodel is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gptq bash scripts/setup.sh gptq
.venv-gptq/bin/python -m pip install --quiet --disable-pip-version-check "pytest>=8" "torch==2.13.0"
# gptqmodel's CPU worker pool asks for one worker per core and fails when it gets fewer
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-$(nproc)}"
QUANTLAB_REQUIRE_INTEROP=1 exec .venv-gptq/bin/python -m pytest -p no:cacheprovider tests/test_interop.py "$@"
