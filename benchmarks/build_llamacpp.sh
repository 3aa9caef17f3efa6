#!/usr/bin/env bash
# Build llama.cpp's llama-bench from the source vendored in the llama-cpp-python sdist
# (shared/reference/real_models.md), for benchmarks/bench_vs_llamacpp.py.
#
#   benchmarks/build_llamacpp.sh [DIR]        # default DIR: ~/.cache/bitcompile/llamacpp
#
# Prints the path of the built binary on its last line. ~6-15 min on 2 cores; needs cmake,
# a C/C++ compiler and network access to PyPI (or a local index with the sdist).
set -euo pipefail
DIR="${1:-${BITCOMPILE_CACHE_DIR:-$HOME/.cache/bitcompile}/llamacpp}"
PYTHON="${PYTHON:-python}"
mkdir -p "$DIR"
cd "$DIR"
if ! ls llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: llama-cpp-python -d .
fi
SDIST=$(ls llama_cpp_python-*.tar.gz | sort | tail -1)
SRC="${SDIST%.tar.gz}"
[ -d "$SRC" ] || tar xzf "$SDIST"
cd "$SRC/vendor/llama.cpp"
cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
nice -n 10 cmake --build build --target llama-bench -j"${JOBS:-2}"
echo "$PWD/build/bin/llama-bench"
