#!/usr/bin/env bash
# llama.cpp's own server (`llama-server`) for `bench-serve --baseline llama-server`: built with cmake from the
# llama.cpp sources that llama-cpp-python's sdist on PyPI vendors (no git clone), into build/llama-server/bin.
#   bash scripts/build_llama_server.sh [VERSION]     # default 0.3.36; needs PyPI, cmake and a C++ compiler; ~20 min on 2 cores
# GGML_NATIVE: tuned for this CPU. A native build crashed in ggml's AMX path on one Xeon: `bench-serve` starts the
# server and waits for /health, so a crash is one line there, not a hang.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-0.3.36}"
work=build/llama-server-src
out=build/llama-server
mkdir -p "$work"
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON > "$work/cmake.log"
cmake --build "$work/build" --target llama-server -j"$(nproc)" > "$work/build.log"
mkdir -p "$out/bin"
cp "$work/build/bin/llama-server" "$out/bin/llama-server.tmp" && mv "$out/bin/llama-server.tmp" "$out/bin/llama-server"
echo "built $out/bin/llama-server (llama.cpp from llama-cpp-python $version)"
