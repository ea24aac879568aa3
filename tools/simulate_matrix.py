#!/usr/bin/env python3
"""The evidence table of docs/simulate.md: `pymoe simulate` over real routing
traces for every policy (lru, lfu, multidim), with and without low-precision
copies, at 25/50/75% of the experts cached, with and without CPU assist.

    python tools/simulate_matrix.py                  # Markdown tables on stdout
    python tools/simulate_matrix.py --json out.json  # and every result as JSON

The traces default to ../shared/traces beside the checkout: the Mixtral-8x7B
decode trace and the five layer logs of one Qwen1.5-MoE run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pymoe._units import MiB
from pymoe.simulate import SimResult, simulate
from pymoe.traces import Trace, load_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
DEFAULT_TRACES = {
    "Mixtral-8x7B (decode, 333 tokens)": ["mixtral8x7b-instruct-fp8_humaneval-p0-1_decode.jsonl"],
    "Qwen1.5-MoE-A2.7B (layers 0, 8, 12, 18, 23)": [
        f"qwen1.5-moe-a2.7b-chat_gsm8k25_layer{n}.jsonl" for n in (0, 8, 12, 18, 23)
    ],
}
POLICIES = ("lru", "lfu", "multidim")
BUDGETS = (0.25, 0.5, 0.75)


def table(name: str, trace: Trace, lo_type: str) -> tuple[str, list[dict[str, Any]]]:
    rows = [
        f"**{name}**",
        "",
        "| cached | policy | hit rate | MiB/token | ms/token | + " + lo_type + ": hit rate | MiB/token | ms/token | "
        "low pairs | with CPU assist: ms/token | + " + lo_type + " |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results: list[SimResult] = []
    for budget in BUDGETS:
        for policy in POLICIES:
            hi, lo, hi_a, lo_a = (
                simulate(trace, budget=budget, policy=policy, lo_type=lt, cpu_assist=assist)
                for assist in (False, True)
                for lt in (None, lo_type)
            )
            results += [hi, lo, hi_a, lo_a]
            rows.append(
                f"| {budget:.0%} | {policy} | {hi.hit_rate:.3f} | {hi.bytes_per_token / MiB:.0f} | "
                f"{hi.latency_per_token_s * 1e3:.1f} | {lo.hit_rate:.3f} | {lo.bytes_per_token / MiB:.0f} | "
                f"{lo.latency_per_token_s * 1e3:.1f} | {lo.lo_share_of_pairs:.1%} | "
                f"{hi_a.latency_per_token_s * 1e3:.1f} | {lo_a.latency_per_token_s * 1e3:.1f} |"
            )
    return "\n".join(rows), [r.as_dict() for r in results]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=Path, default=TRACES, help="the folder of the traces (default: %(default)s)")
    ap.add_argument("--lo-type", default="q2_K", help="the low-precision type (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write every result here")
    args = ap.parse_args(argv)
    out: list[dict[str, Any]] = []
    for name, names in DEFAULT_TRACES.items():
        files = [args.traces / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            print(f"error: missing traces: {', '.join(missing)}; hint: pass --traces DIR", file=sys.stderr)
            return 1
        text, results = table(name, load_trace(files), args.lo_type)
        print(text + "\n", flush=True)
        out += results
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
