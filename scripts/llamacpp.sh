#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-bench, llama-perplexity, llama-quantize,
# llama-imatrix, llama-server) from the llama.cpp sources vendored in the llama-cpp-python
# sdist on PyPI, once, into quantlab's cache. quantlab finds them there (or at $QUANTLAB_LLAMACPP).
#
#   bash scripts/llamacpp.sh          # prints the bin directory when done
#
# The version is pinned (quantlab checks it); a finished build is reused, so a second call
# returns at once. About 10-15 minutes on 2 cores. Needs cmake and a C++ compiler
# (scripts/llamacpp.sh installs them with apt-get when they are missing and it runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."
version="0.3.36"   # llama-cpp-python; keep in step with LLAMACPP_PACKAGE_VERSION in quantlab/engines/llamacpp.py
cache="${QUANTLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantlab}"
# AMX off: CPUs that advertise AMX tiles inside VMs that do not enable them crash in llama.cpp's
# AMX kernels (measured here: every quantized file segfaulted with weight repacking on);
# LLAMACPP_AMX=1 builds them in, into another directory (point QUANTLAB_LLAMACPP at its bin/)
if [ "${LLAMACPP_AMX:-0}" = 1 ]; then
  flags=""
  prefix="$cache/llamacpp/llama-cpp-python-$version-flush-server-amx"
else
  flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  prefix="$cache/llamacpp/llama-cpp-python-$version-flush-server"
fi
# "-server" in the name: builds from before llama-server was added lack it and are not reused
tools=(llama-bench llama-perplexity llama-quantize llama-imatrix llama-server)
if [ -f "$prefix/.complete" ]; then
  echo "$prefix/bin"
  exit 0
fi
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "llamacpp: installing cmake and g++ (Debian packages)" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq cmake g++ >/dev/null
  else
    echo "llamacpp: cmake and a C++ compiler are needed (e.g. apt-get install cmake g++)" >&2
    exit 1
  fi
fi
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] && python=.venv/bin/python
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "llamacpp: downloading the llama-cpp-python $version sdist (PyPI)" >&2
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# One line added: llama-perplexity flushes its log before it exits. llama.cpp's logger runs in a
# thread that is never joined (common/log.cpp), so the final figures quantlab reads ("Final
# estimate", the KL divergence statistics) were lost at exit in about one run of four here.
perl -0pi -e 's/(\n    llama_backend_free\(\);\n)(\n    return 0;\n\}\s*)$/$1    common_log_flush(common_log_main());\n$2/' \
  "$src/tools/perplexity/perplexity.cpp"
grep -q "common_log_flush(common_log_main());" "$src/tools/perplexity/perplexity.cpp" || {
  echo "llamacpp: could not add the log flush to llama-perplexity (sources changed?)" >&2; exit 1; }
echo "llamacpp: building ${tools[*]} (cmake, $(nproc) jobs; about 10-15 minutes on 2 cores)" >&2
# native CPU code (the machine that builds is the machine that measures); no network features;
# llama-server for the serving benchmark, without its web UI (no npm, no prebuilt download)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
cmake --build "$work/build" --config Release -j "$(nproc)" --target "${tools[@]}" >&2
rm -rf "$prefix.tmp"
mkdir -p "$prefix.tmp/bin"
for t in "${tools[@]}"; do
  cp "$work/build/bin/$t" "$prefix.tmp/bin/"
done
# the converter and its gguf-py, for writing GGUF metadata of Hugging Face models
cp "$src/convert_hf_to_gguf.py" "$prefix.tmp/"
cp -r "$src/gguf-py" "$prefix.tmp/gguf-py"
[ -d "$src/conversion" ] && cp -r "$src/conversion" "$prefix.tmp/conversion"
rm -rf "$prefix"
mv "$prefix.tmp" "$prefix"
touch "$prefix/.complete"
echo "$prefix/bin"
