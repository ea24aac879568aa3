#!/usr/bin/env python3
"""Does the expert budget hold? One generation under a memory cgroup, page cache counted.

Prints what `pymoe info --expert-budget` states (slot pools, the engine's own
memory, the non-expert weights, the KV cache) and what the cgroup saw: its peak
(page cache included), how often it hit the limit, and the process's peak RSS.
Needs root and a memory cgroup controller (tools/bench_offload.py's MemCgroup).

    python tools/memory_check.py MODEL.gguf --budget 0.3              # accounting only
    python tools/memory_check.py MODEL.gguf --budget auto --limit 576MiB

With --budget auto the engine sizes the budget from the memory the cgroup
leaves it (pymoe.offload.auto_budget), which is the case that must hold."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench_offload import MemCgroup  # tools/, beside this script
from pagecache import evict

import pymoe
from pymoe._units import MiB
from pymoe.gguf_info import summarize
from pymoe.info import memory_plan
from pymoe.offload import kv_cache_bytes, parse_size

CHILD = """
import pymoe, resource
with pymoe.Model({model!r}, **{kw!r}) as m:
    m.generate("Once upon a time", max_tokens={tokens}, temperature=0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, m.offload_stats(raw=True)["pool_bytes"])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget", default="auto", help="expert budget: 0.3, 50%%, 300MiB or auto (default)")
    ap.add_argument("--limit", help="the cgroup's memory limit (e.g. 576MiB); none: accounting only")
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    budget = float(args.budget) if args.budget.replace(".", "", 1).isdigit() else args.budget
    kw = {"offload": "on", "expert_budget": budget, "n_ctx": 256, "n_batch": 64, "n_threads": 2}
    kw["prefetch"] = args.prefetch
    s = summarize(args.model)
    if budget != "auto":
        plan = memory_plan(args.model, pymoe.Settings(**kw))
        kv = kv_cache_bytes(s, kw["n_ctx"])
        stated = plan["allocated"] + plan["overhead_bytes"] + s.other_bytes + kv
        print(
            f"stated   {stated / MiB:.0f} MiB: slots {plan['allocated'] / MiB:.0f}, engine "
            f"{plan['overhead_bytes'] / MiB:.0f}, other weights {s.other_bytes / MiB:.0f}, KV {kv / MiB:.0f}"
        )
    evict(Path(args.model))
    limit = parse_size(args.limit) if args.limit else None
    with MemCgroup(limit) as cg:
        join = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg.path / "cgroup.procs")]
        child = CHILD.format(model=args.model, kw=kw, tokens=args.tokens)
        proc = subprocess.run([*join, sys.executable, "-c", child], capture_output=True, text=True, cwd="/")
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            print(f"the run failed (exit {proc.returncode}) under the limit", file=sys.stderr)
            return 1
        rss, pools = (int(x) for x in proc.stdout.split()[-2:])
        print(
            f"measured cgroup peak {cg.peak() / MiB:.0f} MiB (page cache included), limit hit {cg.failcnt()} times, "
            f"peak RSS {rss / MiB:.0f} MiB, slots {pools / MiB:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
