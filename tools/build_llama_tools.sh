#!/usr/bin/env bash
# Builds llama.cpp's own command-line tools from the pinned source in
# third_party/llama.cpp (fetch it first: python tools/fetch_llama_cpp.py) into
# build/llama-tools/bin: llama-quantize (tools/bench_convert.py compares
# `pymoe convert` with convert_hf_to_gguf.py + llama-quantize) and llama-bench.
# CPU only, no network code (this llama.cpp dropped libcurl: LLAMA_CURL is a
# deprecated no-op; OpenSSL is off instead); ~4 minutes on 2 cores.
# Re-running rebuilds what changed.
#
# ggml's AMX weight repacking is left out as in pymoe's own build (it crashes
# at the first decode with this llama.cpp; cmake/pymoe-cpu-amx.cmake says why),
# so that `pymoe bench --vs-llama-cpp` compares like with like.
#
# Usage: tools/build_llama_tools.sh [more cmake targets ...]
#   JOBS=N             parallel jobs (default: the number of CPUs)
#   PYMOE_CPU_AMX=ON   build AMX in, as pymoe built with -DPYMOE_CPU_AMX=ON
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/third_party/llama.cpp"
out="$root/build/llama-tools"
jobs="${JOBS:-$(getconf _NPROCESSORS_ONLN)}"

if [[ ! -f "$src/CMakeLists.txt" ]]; then
    echo "error: $src is missing; hint: run python tools/fetch_llama_cpp.py" >&2
    exit 1
fi

cmake -S "$src" -B "$out" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_APP=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_PROJECT_INCLUDE="$root/cmake/pymoe-cpu-amx.cmake" \
    -DPYMOE_CPU_AMX="${PYMOE_CPU_AMX:-OFF}" \
    -DCMAKE_EXPORT_COMPILE_COMMANDS=ON
cmake --build "$out" --config Release -j "$jobs" --target llama-quantize llama-bench "$@"
echo "built: $(ls "$out/bin" | tr '\n' ' ')"
