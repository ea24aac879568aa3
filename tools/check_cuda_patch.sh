#!/usr/bin/env bash
# Compile-checks the CUDA files our patches change, with the installed nvcc,
# for one GPU architecture, without building the rest of ggml's CUDA backend
# (a full CUDA build takes far longer than CI allows on 2 cores).
#
# It configures llama.cpp from third_party with GGML_CUDA=ON and asks the
# generated build system for just these object files, so they compile with
# exactly the flags a real CUDA build uses.
#
# Usage: tools/check_cuda_patch.sh [ARCH]     (ARCH: a CUDA architecture, default 90)
#   BUILD_DIR=...   where to configure (default: build/cuda-check)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/third_party/llama.cpp"
out="${BUILD_DIR:-$root/build/cuda-check}"
arch="${1:-90}"

if ! command -v nvcc >/dev/null; then
    echo "error: nvcc not found; hint: install the CUDA toolkit or put its bin/ on PATH" >&2
    exit 1
fi
python3 "$root/tools/fetch_llama_cpp.py" --dest "$src"

# the .cu files the patches in native/patches touch
mapfile -t units < <(grep -ho '^diff --git a/ggml/src/ggml-cuda/[^ ]*\.cu' "$root"/native/patches/*.patch \
                     | sed 's|^diff --git a/||' | sort -u)
if [[ ${#units[@]} -eq 0 ]]; then
    echo "no CUDA files are patched"
    exit 0
fi

mkdir -p "$out"
# Only compiling, not linking: a toolkit without cuBLAS (like this machine's) still
# works. Its headers come from the PyPI wheel nvidia-cublas (same CUDA major), and the
# link targets the CUDA CMake files want are stubbed.
extra_inc=""
if ! echo '#include <cublas_v2.h>' | nvcc -x cu -E - -o /dev/null 2>/dev/null; then
    major="$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
    inc="$out/cublas-include"
    if [[ ! -f "$inc/cublas_v2.h" ]]; then
        echo "fetching the cuBLAS headers (nvidia-cublas==${major}.0.*) from PyPI"
        wheel_dir="${PYMOE_CACHE_DIR:-$HOME/.cache/pymoe}/downloads"
        mkdir -p "$wheel_dir" "$inc"
        python3 -m pip download --no-deps --only-binary :all: -d "$wheel_dir" "nvidia-cublas==${major}.0.*" >/dev/null
        wheel="$(ls -t "$wheel_dir"/nvidia_cublas-"${major}".0.*.whl | head -1)"
        python3 - "$wheel" "$inc" <<'PY'
import sys, zipfile, pathlib
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if "/include/" in n and n.endswith(".h"):
            (pathlib.Path(sys.argv[2]) / pathlib.Path(n).name).write_bytes(z.read(n))
PY
    fi
    extra_inc="-I$inc"
fi
cat > "$out/stub-targets.cmake" <<'CMAKE'
foreach(t cublas cublas_static cublasLt cublasLt_static cuda_driver)
    if (NOT TARGET CUDA::${t})
        add_library(CUDA::${t} INTERFACE IMPORTED GLOBAL)
    endif()
endforeach()
CMAKE

cmake -S "$src" -B "$out" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PROJECT_INCLUDE="$out/stub-targets.cmake" \
    -DCMAKE_CUDA_FLAGS="$extra_inc" -DCMAKE_CXX_FLAGS="$extra_inc" \
    -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" \
    -DGGML_NATIVE=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=OFF >/dev/null

targets=()
for u in "${units[@]}"; do
    rel="${u#ggml/src/}"                          # ggml-cuda/add-id.cu
    targets+=("ggml/src/ggml-cuda/CMakeFiles/ggml-cuda.dir/${rel#ggml-cuda/}.o")
done
echo "compiling for sm_$arch: ${units[*]}"
start=$(date +%s)
ninja -C "$out" "${targets[@]}"
echo "ok: ${#units[@]} CUDA files compile with $(nvcc --version | tail -1) in $(( $(date +%s) - start )) s"
