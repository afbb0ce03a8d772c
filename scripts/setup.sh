#!/usr/bin/env bash
# Create .venv and install quantlab into it, with PyTorch pinned to the local CPU build.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh dev
# VENV=DIR picks another environment directory (scripts/interop.sh uses .venv-gptq).
# Idempotent: a second call with unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.quantlab-setup-$(sha256sum pyproject.toml | cut -c1-16)-${extras:-base}"
if [ -f "$stamp" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
echo "setup: installing torch==2.13.0 (CPU build)" >&2
"${pip[@]}" "torch==2.13.0"
target="."
[ -n "$extras" ] && target=".[$extras]"
echo "setup: installing quantlab${extras:+[$extras]} (editable)" >&2
# the pin again, in the same resolution: an extra whose newest release wants a newer torch
# (gptqmodel 7.7 does) must get an older release of itself, not a CUDA torch
"${pip[@]}" -e "$target" "torch==2.13.0"
rm -f "$venv"/.quantlab-setup-*
touch "$stamp"
