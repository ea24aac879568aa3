#!/usr/bin/env python3
"""What the engine's per-layer sync point costs a decode token.

The engine stops the graph after every MoE layer's router (the scheduler's
eval callback), plans, and writes the layer's expert ids before the experts
run. This measures that cost on the device a model runs on -- the CPU, or an
RPC device (`--rpc HOST:PORT`, every layer on it) -- by decoding the same
tokens three ways:

  off      the engine off: upstream's graph, no sync point;
  hits     the engine on, every expert in a slot (budget 1.0, warmed up): the
           sync point, the plan and the id write, but no loads;
  callback the engine's own account of the time inside the callback
           (plan_seconds) per layer.

(hits - off) / MoE layers is the sync point's cost per layer and token, as the
graph pays it (the extra split, the backend synchronisation, the callback and
the branch sum). Usage:

    python tools/sync_cost.py MODEL.gguf [--rpc HOST:PORT | --gpu] [-n 64] [-t 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def decode_times(model_path: str, n: int, settings: dict) -> tuple[list[float], dict | None]:
    import pymoe

    with pymoe.Model(model_path, **settings) as m:
        rng = np.random.default_rng(1)
        prompt = rng.integers(0, m.n_vocab, 16).tolist()
        tokens = list(prompt)
        # warm up: the pages mapped in, every expert loaded into its slot once
        for _ in range(8):
            tokens.append(int(np.argmax(m.next_token_logits(tokens))))
        m.reset_stats()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            logits = m.next_token_logits(tokens)
            times.append(time.perf_counter() - t0)
            tokens.append(int(np.argmax(logits)))
        return times, m.offload_stats(raw=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rpc", default=None, help="HOST:PORT of a `pymoe rpc-server` (every layer on it)")
    ap.add_argument("--gpu", action="store_true", help="every layer on this machine's GPU (a GPU build)")
    ap.add_argument("-n", type=int, default=64, help="decode tokens timed (default: %(default)s)")
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    base: dict = {"n_threads": args.threads, "repack": False, "n_ctx": 512}
    if args.rpc:
        base.update(rpc=(args.rpc,), n_gpu_layers=99)
    elif args.gpu:
        base.update(n_gpu_layers=99)
    else:
        base.update(n_gpu_layers=0)
    off, _ = decode_times(args.model, args.n, {**base, "offload": "off"})
    hits, raw = decode_times(
        args.model, args.n, {**base, "offload": "on", "expert_budget": 1.0, "cpu_assist": False, "prefetch": False}
    )
    assert raw is not None
    layers = [lay for lay in raw["layers"] if lay["steps"]]
    n_moe = len(layers)
    hit_rate = sum(lay["hits"] for lay in layers) / max(1, sum(lay["hits"] + lay["misses"] for lay in layers))
    plan = sum(lay["plan_seconds"] for lay in layers) / max(1, layers[0]["steps"]) / n_moe
    res = {
        "device": f"RPC {args.rpc}" if args.rpc else "GPU" if args.gpu else "CPU",
        "moe_layers": n_moe,
        "tokens": args.n,
        "off_ms_per_token": statistics.median(off) * 1e3,
        "hits_ms_per_token": statistics.median(hits) * 1e3,
        "hit_rate": hit_rate,
        "sync_us_per_layer": (statistics.median(hits) - statistics.median(off)) / n_moe * 1e6,
        "callback_us_per_layer": plan * 1e6,
    }
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
