#!/usr/bin/env python3
"""The GPU tier's benchmark (run by tools/gpu_check.sh on a CUDA machine).

For a Mixtral-8x7B-shaped and a Qwen3-30B-A3B-shaped synthetic model
(tools/make_synthetic_moe.py: real shapes, random weights) with real routing
traces replayed (../shared/traces, fitted to the model's layers and top-k), at
device budgets of 25% and 50% of the expert bytes:

- pymoe: every layer on the GPU (-ngl 99), experts in pinned host memory,
  slots on the GPU, misses on the CPU and admitted in the background;
- llama.cpp's llama-bench from the same source with the best static offload
  for the same device memory: `--n-cpu-moe N`, N the fewest layers whose
  experts must stay on the CPU for the rest to fit the budget;
- llama-bench fully resident (-ngl 99): the ceiling.

Decode and prefill tokens/s, and for pymoe the hit rate, bytes uploaded per
decode token and the share of pairs the CPU computed. Writes OUT/bench.json
and OUT/bench.md.

    python tools/gpu_bench.py --out gpu-check [--quick] [--llama-bench PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "traces"
PRESETS = {  # preset: the trace replayed
    "mixtral-8x7b": "mixtral8x7b-instruct-fp8_humaneval-p0-1_decode.jsonl",
    "qwen3-30b-a3b": "qwen1.5-moe-a2.7b-chat_gsm8k25_layer12.jsonl",
}
QUICK = {"mixtral-mini": PRESETS["mixtral-8x7b"], "qwen3-mini": PRESETS["qwen3-30b-a3b"]}


def make_model(preset: str, folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tools"))
    import make_synthetic_moe

    out = folder / f"{preset}.gguf"
    if not out.is_file():
        make_synthetic_moe.main([preset, "-o", str(out)])
    return out


def run_pymoe(model: Path, trace: Path, share: float, n_prompt: int, n_gen: int, rpc: str | None) -> dict:
    """One configuration in a child process (its own CUDA context and pinned memory)."""
    code = f"""
import json, pymoe
from pymoe import stats
from pymoe.bench import timed_run
from pymoe.traces import load_trace
s = pymoe.summarize({str(model)!r})
routes = load_trace({str(trace)!r}).fit_routes(s.n_layer, s.n_expert, s.n_expert_used)
with pymoe.Model({str(model)!r}, n_gpu_layers=99, offload="on", expert_budget={share}, replay=routes, n_ctx=4096,
                 rpc={(rpc,) if rpc else ()!r}) as m:
    r = timed_run(m, n_prompt={n_prompt}, n_gen={n_gen}, reps=2)
    raw = m.offload_stats(raw=True)
    # the last repetition's decode: its counters minus those after its prefill
    d = stats.difference(stats.totals(raw["layers"]), stats.totals(r.stats_after_prefill["layers"]))
    print(json.dumps({{"pp": r.pp_tokens_per_second, "tg": r.tg_tokens_per_second, "hit_rate": stats.hit_rate(d),
        "uploaded_per_token": (d["bytes_loaded"] + d["bytes_admitted"] + d["prefetch_bytes"]) / {n_gen},
        "cpu_share": d["direct_pairs"] / max(1, d["pairs"]), "pools_by_buffer": raw["pools_by_buffer"],
        "link_gbps": raw["read_bandwidth"] / 1e9, "cpu_gbps": raw["direct_bandwidth"] / 1e9}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600, cwd="/")
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_llama_bench(exe: Path, model: Path, n_prompt: int, n_gen: int, n_cpu_moe: int | None, rpc: str | None) -> dict:
    cmd = [str(exe), "-m", str(model), "-ngl", "99", "-p", str(n_prompt), "-n", str(n_gen), "-r", "2", "-o", "json"]
    if rpc:
        cmd += ["--rpc", rpc]
    if n_cpu_moe:
        cmd += ["--n-cpu-moe", str(n_cpu_moe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "cmd": " ".join(cmd)}
    rows = json.loads(proc.stdout)
    out: dict = {"cmd": " ".join(cmd)}
    for r in rows:
        out["pp" if r["n_prompt"] else "tg"] = r["avg_ts"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--quick", action="store_true", help="the scaled-down presets (minutes, not an hour)")
    ap.add_argument("--llama-bench", type=Path, default=ROOT / "build" / "gpu-ops" / "bin" / "llama-bench")
    ap.add_argument("--shares", default="0.25,0.5")
    ap.add_argument("--rpc", default=None, help="an RPC device instead of the GPU (a smoke run of this script)")
    ap.add_argument("--presets", default=None, help="comma-separated presets instead of the defaults")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-n", "--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import pymoe

    presets = QUICK if args.quick else PRESETS
    if args.presets:
        presets = {p: (QUICK | PRESETS).get(p, PRESETS["mixtral-8x7b"]) for p in args.presets.split(",")}
    n_prompt, n_gen = (128, 32) if args.quick else (args.prompt_tokens, args.gen_tokens)
    rows = []
    for preset, trace_name in presets.items():
        model = make_model(preset, ROOT / "build" / "gpu-check")
        s = pymoe.summarize(model)
        trace = TRACES / trace_name
        ceiling = run_llama_bench(args.llama_bench, model, n_prompt, n_gen, None, args.rpc)
        for share in (float(x) for x in args.shares.split(",")):
            # the same device memory for llama.cpp: the experts of floor(share x layers) layers on the GPU
            n_cpu_moe = s.n_layer - math.floor(share * s.n_layer)
            row = {
                "model": preset,
                "expert_gib": s.expert_bytes / 2**30,
                "share": share,
                "pymoe": run_pymoe(model, trace, share, n_prompt, n_gen, args.rpc),
                "llama_n_cpu_moe": n_cpu_moe,
                "llama": run_llama_bench(args.llama_bench, model, n_prompt, n_gen, n_cpu_moe, args.rpc),
                "resident": ceiling,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        model.unlink()  # tens of GB: the next preset needs the disk
    (args.out / "bench.json").write_text(json.dumps({"prompt": n_prompt, "gen": n_gen, "rows": rows}, indent=2))

    def f(x: object) -> str:
        return f"{x:.1f}" if isinstance(x, float) else "-"

    md = [
        f"pp{n_prompt} / tg{n_gen} tokens/s; llama-bench with --n-cpu-moe N for the same device memory",
        "",
        "| model | share | pymoe tg | pymoe pp | hit | MiB up/token | CPU share | llama.cpp N | llama tg | "
        "llama pp | resident tg | resident pp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, lb, rs = r["pymoe"], r["llama"], r["resident"]
        md.append(
            f"| {r['model']} | {r['share']:.0%} | {f(p.get('tg'))} | {f(p.get('pp'))} | {f(p.get('hit_rate'))} | "
            f"{f(p.get('uploaded_per_token', 0) / 2**20 if 'uploaded_per_token' in p else None)} | "
            f"{f(p.get('cpu_share'))} | {r['llama_n_cpu_moe']} | {f(lb.get('tg'))} | {f(lb.get('pp'))} | "
            f"{f(rs.get('tg'))} | {f(rs.get('pp'))} |"
        )
    (args.out / "bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
