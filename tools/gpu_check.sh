#!/usr/bin/env bash
# The GPU tier on a real NVIDIA GPU, in one prepared run (none was available
# where pymoe's GPU tier was built: it was proved exact through ggml's RPC
# backend instead). Stages, in order:
#
#   build  pymoe built with CUDA into .venv-gpu (one architecture), timed
#   ops    ggml's test-backend-ops for the skipped-id cases of patch 0001
#          (MUL_MAT_ID and ADD_ID with negative ids) on CUDA against the CPU;
#          also builds the bench stage's llama-bench from the same source
#   exact  tools/gpu_exact.py: logits with the engine on vs off, every layer on
#          the GPU, budgets 0 / 0.3 / 1.0, LRU / multidim / prefetching
#   sync   tools/sync_cost.py: the per-layer sync point's cost on CUDA
#   bench  tools/gpu_bench.py: Mixtral-8x7B- and Qwen3-30B-A3B-shaped models
#          with the real routing traces replayed, device budgets of 25% and
#          50% of the experts: pymoe vs llama-bench with the best --n-cpu-moe
#          for the same device memory, vs fully resident
#
# Everything goes to OUT (default gpu-check/): one log per stage,
# summary.json and summary.md.
#
#   tools/gpu_check.sh [OUT]
#   STAGES="build ops exact"   run some stages only (default: all)
#   CUDA_ARCH=90               the GPU architecture (default: what nvidia-smi reports)
#   QUICK=1                    bench: the smaller presets and fewer tokens (a few minutes)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(mkdir -p "${1:-gpu-check}" && cd "${1:-gpu-check}" && pwd)"
stages="${STAGES:-build ops exact sync bench}"
cd "$root"

log() { echo "gpu_check: $*" | tee -a "$out/progress.log"; }
has() { [[ " $stages " == *" $1 "* ]]; }
now() { date +%s; }

command -v nvcc >/dev/null || { echo "error: nvcc not found; hint: put the CUDA toolkit's bin/ on PATH" >&2; exit 1; }
command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: no NVIDIA GPU here" >&2; exit 1; }
arch="${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')}"
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version,compute_cap --format=csv > "$out/gpu.csv"
log "GPU: $(tail -1 "$out/gpu.csv"); arch sm_$arch; $(nproc) CPU cores"
echo "{}" > "$out/summary.json"
put() {  # put KEY JSON-VALUE: into summary.json
    python3 - "$out/summary.json" "$1" "$2" <<'EOF'
import json, sys
path, key, value = sys.argv[1:4]
d = json.load(open(path))
d[key] = json.loads(value)
json.dump(d, open(path, "w"), indent=2)
EOF
}

if has build; then
    t0=$(now)
    python3 -m venv .venv-gpu
    .venv-gpu/bin/pip install -q numpy gguf tqdm jinja2 huggingface-hub scikit-build-core pybind11 ninja cmake
    python3 tools/fetch_llama_cpp.py
    CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=ON" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        .venv-gpu/bin/pip install -v --no-build-isolation -e . > "$out/build.log" 2>&1
    secs=$(( $(now) - t0 ))
    log "build: pymoe with CUDA (sm_$arch) in ${secs} s"
    put build "{\"seconds\": $secs, \"arch\": \"$arch\"}"
    .venv-gpu/bin/python -c "import pymoe, json; print(json.dumps(pymoe._core.devices()))" > "$out/devices.json"
fi
py="$root/.venv-gpu/bin/python"

if has ops; then
    t0=$(now)
    cmake -S third_party/llama.cpp -B build/gpu-ops -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
        -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PROJECT_INCLUDE="$root/cmake/pymoe-cpu-amx.cmake" -DPYMOE_CPU_AMX="${PYMOE_CPU_AMX:-OFF}" \
        > "$out/ops-build.log" 2>&1
    # llama-bench too: the bench stage's baseline (tools/gpu_bench.py --llama-bench), with pymoe's AMX
    # setting (cmake/pymoe-cpu-amx.cmake: AMX repacking segfaults; the comparison needs the same CPU code)
    cmake --build build/gpu-ops --target test-backend-ops llama-bench -j "$(nproc)" >> "$out/ops-build.log" 2>&1
    ops_rc=0
    for op in MUL_MAT_ID ADD_ID; do
        build/gpu-ops/bin/test-backend-ops test -b CUDA0 -o "$op" -p skip >> "$out/ops.log" 2>&1 || ops_rc=$?
    done
    passed=$(grep -c "OK" "$out/ops.log" || true)
    failed=$(grep -c "FAIL" "$out/ops.log" || true)
    log "ops: test-backend-ops skip cases on CUDA: $passed ok, $failed failed ($(( $(now) - t0 )) s)"
    put ops "{\"ok\": $passed, \"failed\": $failed, \"rc\": $ops_rc}"
fi

if has exact; then
    exact_rc=0
    "$py" tools/gpu_exact.py --json "$out/exact.json" > "$out/exact.log" 2>&1 || exact_rc=$?
    log "exact: rc $exact_rc (tools/gpu_exact.py; $out/exact.log)"
    put exact "$(cat "$out/exact.json" 2>/dev/null || echo null)"
fi

if has sync; then
    "$py" tools/gpu_exact.py --json /dev/null >/dev/null 2>&1 || true  # makes the tiny model if needed
    "$py" tools/sync_cost.py build/gpu-check/tiny.gguf -n 64 --json --gpu > "$out/sync.json" 2> "$out/sync.log" || true
    log "sync: $(cat "$out/sync.json" 2>/dev/null)"
    put sync "$(cat "$out/sync.json" 2>/dev/null || echo null)"
fi

if has bench; then
    quick=()
    [[ -n "${QUICK:-}" ]] && quick=(--quick)
    "$py" tools/gpu_bench.py --out "$out" "${quick[@]}" > "$out/bench.log" 2>&1 || log "bench failed: see bench.log"
    log "bench: $out/bench.md"
    put bench "$(cat "$out/bench.json" 2>/dev/null || echo null)"
fi

"$py" - "$out" <<'EOF' || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
s = json.loads((out / "summary.json").read_text())
lines = ["# pymoe GPU check", "", f"GPU: {(out / 'gpu.csv').read_text().splitlines()[-1]}", ""]
if "build" in s:
    lines.append(f"- build with CUDA (sm_{s['build']['arch']}): {s['build']['seconds']} s")
if "ops" in s:
    lines.append(f"- test-backend-ops skip cases: {s['ops']['ok']} ok, {s['ops']['failed']} failed")
if s.get("exact"):
    for r in s["exact"]["rows"]:
        lines.append(f"- exact, {r['config']}: NMSE {r['nmse_batch']:.1e} / {r['nmse_decode']:.1e}, "
                     f"argmax {r['argmax_agree']:.3f}, {'ok' if r['ok'] else 'OFF'}")
if s.get("sync"):
    lines.append(f"- sync point: {s['sync'].get('sync_us_per_layer', 0):.1f} us per MoE layer and token")
bench = out / "bench.md"
if bench.is_file():
    lines += ["", bench.read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
