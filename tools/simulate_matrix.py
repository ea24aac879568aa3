#!/usr/bin/env python3
"""The evidence tables of docs/simulate.md: `pymoe simulate` over real routing
traces at 25/50/75% of the experts cached.

- policies: every routing trace of ../shared/traces, every online policy (lru,
  lfu, multidim, lrfu, markov) against Belady's optimal offline bound, with
  every miss loaded (--no-cpu-assist) and in the default mode (CPU assist and
  background admission);
- precision: lru, lfu and multidim with and without low-precision copies, with
  and without CPU assist, on the Mixtral decode trace and the Qwen1.5-MoE run.

    python tools/simulate_matrix.py                    # Markdown tables on stdout
    python tools/simulate_matrix.py --tables policies  # one set
    python tools/simulate_matrix.py --json out.json    # and every result as JSON

The traces default to ../shared/traces beside the checkout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pymoe._units import MiB
from pymoe.simulate import BOUND_POLICY, SimResult, simulate
from pymoe.traces import Trace, load_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
QWEN_RUN = [f"qwen1.5-moe-a2.7b-chat_gsm8k25_layer{n}.jsonl" for n in (0, 8, 12, 18, 23)]
MIXTRAL_DECODE = ["mixtral8x7b-instruct-fp8_humaneval-p0-1_decode.jsonl"]
# the precision tables' traces
DEFAULT_TRACES = {
    "Mixtral-8x7B (decode, 333 tokens)": MIXTRAL_DECODE,
    "Qwen1.5-MoE-A2.7B (layers 0, 8, 12, 18, 23)": QWEN_RUN,
}
# every routing trace in shared/traces (the outputs and expert-count files are not routing traces)
ALL_TRACES = {
    "Mixtral-8x7B, HumanEval 0-1, decode": MIXTRAL_DECODE,
    "Mixtral-8x7B, HumanEval 0, prefill + decode": ["mixtral8x7b-instruct-fp8_humaneval-p0_prefill+decode_raw.jsonl"],
    "Qwen1.5-MoE-A2.7B, GSM8K, layers 0 8 12 18 23": QWEN_RUN,
    "Qwen1.5-MoE-A2.7B, GSM8K, layer 0, 2nd run": ["qwen1.5-moe-a2.7b-chat_gsm8k25_layer0_run2.jsonl"],
    "OLMoE-1B-7B, GSM8K, layer 0": ["olmoe-1b-7b-0924_gsm8k25_layer0.jsonl"],
}
POLICIES = ("lru", "lfu", "multidim")
ONLINE = ("lru", "lfu", "multidim", "lrfu", "markov")
NEW = "markov"
BUDGETS = (0.25, 0.5, 0.75)
MODES = {
    "every miss loaded (`--no-cpu-assist`)": {"cpu_assist": False},
    "default: CPU assist + background admission": {},
}


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


def policy_tables(traces: dict[str, Trace]) -> tuple[str, list[dict[str, Any]]]:
    """Hit rates of every policy and Belady's bound, per trace and budget, in both modes."""
    out: list[str] = []
    results: list[dict[str, Any]] = []
    cols = (*ONLINE, BOUND_POLICY)
    for mode, options in MODES.items():
        assist = options.get("cpu_assist", True)
        head = "| trace | cached | " + " | ".join(cols) + f" | {NEW} - lru |"
        head += " lru ms/token | markov ms/token |" if assist else ""
        out += [f"**Hit rate, {mode}**", "", head, "|---|---:|" + "---:|" * (len(cols) + 1 + 2 * assist)]
        for name, trace in traces.items():
            for budget in BUDGETS:
                res = {p: simulate(trace, budget=budget, policy=p, **options) for p in cols}
                results += [{"trace": name, "mode": mode, **r.as_dict()} for r in res.values()]
                best = max(res[p].hit_rate for p in ONLINE)
                bold = {p for p in ONLINE if res[p].hit_rate == best}
                cells = [f"**{res[p].hit_rate:.3f}**" if p in bold else f"{res[p].hit_rate:.3f}" for p in cols]
                line = f"| {name} ({trace.n_tokens} tokens) | {budget:.0%} | " + " | ".join(cells)
                line += f" | {res[NEW].hit_rate - res['lru'].hit_rate:+.3f} |"
                if assist:
                    line += f" {res['lru'].latency_per_token_s * 1e3:.1f} | {res[NEW].latency_per_token_s * 1e3:.1f} |"
                out.append(line)
        out.append("")
    return "\n".join(out), results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=Path, default=TRACES, help="the folder of the traces (default: %(default)s)")
    ap.add_argument("--lo-type", default="q2_K", help="the low-precision type (default: %(default)s)")
    ap.add_argument(
        "--tables",
        default="policies,precision",
        help="which tables: policies, precision or both (default: %(default)s)",
    )
    ap.add_argument("--json", type=Path, help="also write every result here")
    args = ap.parse_args(argv)
    wanted = {t.strip() for t in args.tables.split(",")}
    if not wanted or wanted - {"policies", "precision"}:
        print("error: --tables takes policies, precision or both; hint: --tables policies", file=sys.stderr)
        return 1
    names = {**(ALL_TRACES if "policies" in wanted else {}), **(DEFAULT_TRACES if "precision" in wanted else {})}
    missing = [str(args.traces / n) for files in names.values() for n in files if not (args.traces / n).is_file()]
    if missing:
        print(f"error: missing traces: {', '.join(missing)}; hint: pass --traces DIR", file=sys.stderr)
        return 1
    cache: dict[tuple[str, ...], Trace] = {}

    def get(files: list[str]) -> Trace:
        if tuple(files) not in cache:
            cache[tuple(files)] = load_trace([args.traces / n for n in files])
        return cache[tuple(files)]

    out: list[dict[str, Any]] = []
    if "policies" in wanted:
        text, results = policy_tables({name: get(files) for name, files in ALL_TRACES.items()})
        print(text, flush=True)
        out += results
    if "precision" in wanted:
        for name, files in DEFAULT_TRACES.items():
            text, results = table(name, get(files), args.lo_type)
            print(text + "\n", flush=True)
            out += results
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
