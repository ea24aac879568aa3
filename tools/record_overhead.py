#!/usr/bin/env python3
"""What recording the routing (--record-routing) costs a decode: two copies of
the model open at once, one recording, timed in turn (so that both see the
same machine load) with pymoe bench's timed run (greedy decode, EOS ignored),
repeated; prints the best and the median decode time per token of each,
their process CPU time per token, and the time the engine spent recording
(its record_seconds counter: the recorder and the gate-weight reads it needs),
which a loaded machine does not blur as it blurs the difference of two runs.

    python tools/record_overhead.py                      # the demo model
    python tools/record_overhead.py MODEL.gguf --budget 0.5 --tier host -n 64 --rounds 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from pymoe import Model, stats
from pymoe.bench import timed_run
from pymoe.demo import demo_model_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, help="a MoE GGUF (default: the demo model)")
    ap.add_argument("--budget", default="0.5", help="expert budget (default: %(default)s)")
    ap.add_argument("--tier", default="host", choices=("disk", "host"), help="offload tier (default: %(default)s)")
    ap.add_argument("-n", "--tokens", type=int, default=64, help="tokens generated a round (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of each (default: %(default)s)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    model = args.model or demo_model_path()
    budget = float(args.budget) if "." in args.budget else args.budget
    kw = {"n_ctx": 512, "offload": "on", "expert_budget": budget, "offload_tier": args.tier, "n_threads": args.threads}
    wall: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    inside: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.routes"
        with Model(model, **kw) as off, Model(model, **kw, record_routing=str(path)) as on:
            models = {"off": off, "on": on}
            for r in range(args.rounds):
                for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    run = timed_run(models[mode], n_prompt=16, n_gen=args.tokens, greedy=True, warmup=r < 2)
                    wall[mode].append(run.tg_seconds[0] / args.tokens)
                    cpu[mode].append(run.cpu_seconds / (16 + args.tokens))
                    if mode == "on":  # the engine's own clock around the recorder (the counters cover the run)
                        raw = stats.totals(on.offload_stats(raw=True)["layers"])
                        inside.append(raw["record_seconds"] / (16 + args.tokens))
        size = path.stat().st_size
    for mode in ("off", "on"):
        print(
            f"recording {mode:3}: decode best {min(wall[mode]) * 1e3:.2f} ms/token, "
            f"median {statistics.median(wall[mode]) * 1e3:.2f}; "
            f"CPU median {statistics.median(cpu[mode]) * 1e3:.2f} ms/token"
        )
    best = min(wall["on"]) / min(wall["off"]) - 1
    med = statistics.median(wall["on"]) / statistics.median(wall["off"]) - 1
    med_cpu = statistics.median(cpu["on"]) / statistics.median(cpu["off"]) - 1
    print(
        f"overhead: {best:+.1%} (best of {args.rounds}), {med:+.1%} (median), CPU {med_cpu:+.1%} (median); "
        f"record {size / 1024:.0f} KiB"
    )
    share = statistics.median(inside) / statistics.median(wall["off"])
    print(
        f"inside the engine: recording took {statistics.median(inside) * 1e6:.1f} us/token (median), "
        f"{share:.2%} of a decode token without it"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
