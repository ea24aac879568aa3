#!/usr/bin/env python3
"""Is the GPU tier exact on this machine's device? Logits with the engine on
against the engine off, every layer on the device (-ngl 99), on the same model.

On a CUDA GPU the misses are computed by the CPU's kernels and the hits by
CUDA's, so the bar is the backend's own tolerance (test-backend-ops's NMSE
style), not bit equality; over an RPC device serving the CPU backend
(`--rpc HOST:PORT`) it must be bit for bit, as tests/test_rpc.py checks.

    python tools/gpu_exact.py MODEL.gguf [--rpc HOST:PORT] [--json OUT]

Without MODEL, a tiny synthetic model is made (tools/make_synthetic_moe.py).
Exit status 1 when a configuration is off by more than the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

CONFIGS = {
    "budget 0": {"expert_budget": 0.0},
    "budget 0.3 lru": {"expert_budget": 0.3},
    "budget 0.3 multidim": {"expert_budget": 0.3, "policy": "multidim"},
    "budget 0.3 prefetch": {"expert_budget": 0.3, "prefetch": True},
    "budget 0.3 no admission": {"expert_budget": 0.3, "admission": False},
    "budget 1.0 load every miss": {"expert_budget": 1.0, "cpu_assist": False},
}


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).sum() / max((b**2).sum(), 1e-30))


def run(model: str, base: dict, tokens: list[int], decode: int) -> tuple[np.ndarray, np.ndarray, dict | None]:
    import pymoe

    with pymoe.Model(model, **base) as m:
        batch = m.logits(tokens)
        prefix = tokens[: len(tokens) - decode]
        steps = [m.next_token_logits(prefix)]
        for i in range(len(prefix), len(tokens)):
            steps.append(m.next_token_logits(tokens[: i + 1]))
        return batch, np.stack(steps), m.offload_stats()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--rpc", default=None, help="an RPC device instead of this machine's GPU")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16, help="of those, fed one at a time at the end")
    ap.add_argument("--nmse", type=float, default=1e-6, help="tolerance on a GPU (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    model = args.model
    if model is None:
        sys.path.insert(0, str(Path(__file__).parent))
        import make_synthetic_moe

        out = Path("build/gpu-check/tiny.gguf")
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.is_file():
            make_synthetic_moe.main(["tiny", "-o", str(out)])
        model = str(out)
    base = {"n_gpu_layers": 99, "cache_type": "f32", "repack": False, "n_ctx": 512}
    if args.rpc:
        base["rpc"] = (args.rpc,)
    rng = np.random.default_rng(0)
    import pymoe

    with pymoe.Model(model, offload="off", n_ctx=64) as m:
        tokens = rng.integers(0, m.n_vocab, args.tokens).tolist()
    ref_b, ref_d, _ = run(model, {**base, "offload": "off"}, tokens, args.decode)
    tol = 0.0 if args.rpc else args.nmse
    rows, ok = [], True
    for name, kw in CONFIGS.items():
        b, d, stats = run(model, {**base, "offload": "on", **kw}, tokens, args.decode)
        assert stats is not None
        row = {
            "config": name,
            "nmse_batch": nmse(b, ref_b),
            "nmse_decode": nmse(d, ref_d),
            "argmax_agree": float((b.argmax(-1) == ref_b.argmax(-1)).mean()),
            "pool_pairs": stats["pool_pairs"],
            "direct_pairs": stats["direct_pairs"],
            "admissions": stats["admissions"],
            "hit_rate": stats["hit_rate"],
        }
        row["ok"] = row["nmse_batch"] <= tol and row["nmse_decode"] <= tol
        ok &= row["ok"]
        rows.append(row)
        print(
            f"{name:28s} nmse {row['nmse_batch']:.2e} / {row['nmse_decode']:.2e}  argmax {row['argmax_agree']:.3f}  "
            f"pool {row['pool_pairs']} cpu {row['direct_pairs']} admitted {row['admissions']}  "
            f"{'ok' if row['ok'] else 'OFF'}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"model": model, "tolerance": tol, "rows": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
