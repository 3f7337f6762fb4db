#!/usr/bin/env bash
# Builds llama.cpp's llama-bench and llama-quantize for benchmarks/bench_llamacpp.py.
#
# The source is the llama.cpp that llama-cpp-python vendors in its PyPI sdist (vendor/llama.cpp), so
# the build needs only PyPI, not GitHub. Everything goes into a cache folder that git ignores:
#   $LLAMACPP_CACHE (default <repo>/.bench-cache/llama.cpp)/{sdist,src,build}; binaries in build/bin.
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  the llama-cpp-python release whose llama.cpp is built (default 0.3.36)
#   LLAMACPP_CACHE            the cache folder
#   PYTHON                    the python whose pip downloads the sdist (default python3)
#   JOBS                      parallel compile jobs (default 2)
#   NICE                      nice level of the compile (default 19: the build must not slow other work)
# Takes 10-20 minutes on 2 cores; re-running after a finished build only re-checks it.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LLAMACPP_CACHE:-$REPO/.bench-cache/llama.cpp}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
NICE="${NICE:-19}"

mkdir -p "$CACHE/sdist"
SDIST="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    echo "== downloading llama-cpp-python $VERSION sdist"
    "$PYTHON" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
fi

# A new version replaces the old source and build, so the binaries always match VERSION.
SRC="$CACHE/src"
if [[ "$(cat "$CACHE/VERSION" 2>/dev/null)" != "$VERSION" ]]; then
    echo "== extracting vendor/llama.cpp"
    rm -rf "$SRC" "$CACHE/build"
    tmp="$(mktemp -d "$CACHE/extract.XXXXXX")"
    tar -xzf "$SDIST" -C "$tmp" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$tmp"
    echo "$VERSION" > "$CACHE/VERSION"
fi

BUILD="$CACHE/build"
echo "== configuring"
# GGML_NATIVE: tuned for this CPU, as a user building llama.cpp here would. No HTTPS/downloads (the
# benchmark only reads local GGUFs), static so the two binaries stand alone, no tests/examples/server.
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
echo "== building llama-bench, llama-quantize (nice $NICE, -j$JOBS)"
start=$(date +%s)
nice -n "$NICE" cmake --build "$BUILD" --config Release -j"$JOBS" --target llama-bench llama-quantize
echo "== built in $(( $(date +%s) - start ))s: $BUILD/bin/llama-bench, $BUILD/bin/llama-quantize"
