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
# GGML_NATIVE=ON turns on AMX wherever the CPU flags list it; on the project's Sapphire-Rapids-class
# VM such a binary dies with SIGILL (the guest may not use AMX tiles). Where the flags list AMX,
# build for AVX-512 (VBMI/VNNI/BF16) with AMX off instead; elsewhere keep the native build.
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    BUILD=build-noamx
    cmake -B "$BUILD" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
else
    BUILD=build
    cmake -B "$BUILD" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
fi
nice -n 10 cmake --build "$BUILD" --target llama-bench -j"${JOBS:-2}"
echo "$PWD/$BUILD/bin/llama-bench"
