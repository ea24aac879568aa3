"""Runs models on an RPC device in a process of its own (ggml's device registry
is process-wide: the test process itself never connects to a server).

    python rpc_child.py SPEC.json OUT.npz

SPEC: {"model": path, "tokens": [...], "runs": {name: {settings...}}, "decode": n}
For each run: the teacher-forced logits of the tokens in one batch, and (when
"decode" > 0) the logits of the last `decode` tokens fed one at a time after
the others, as generation does; the engine's stats and `pymoe info`'s memory plan for the same settings go to
OUT.json.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import pymoe
from pymoe import stats
from pymoe.info import memory_plan


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    tokens = spec["tokens"]
    n_decode = int(spec.get("decode", 0))
    arrays: dict[str, np.ndarray] = {}
    report: dict[str, dict] = {}
    for name, kw in spec["runs"].items():
        kw = dict(kw)
        kw["rpc"] = tuple(kw.get("rpc", ()))
        with pymoe.Model(spec["model"], **kw) as m:
            arrays[f"{name}.batch"] = m.logits(tokens)
            if n_decode:
                prefix = tokens[: len(tokens) - n_decode]
                steps = [m.next_token_logits(prefix)]
                for i in range(len(prefix), len(tokens)):
                    steps.append(m.next_token_logits(tokens[: i + 1]))
                arrays[f"{name}.decode"] = np.stack(steps)
            raw = m.offload_stats(raw=True)
            report[name] = {"devices": [d["name"] for d in pymoe._core.devices()]}
            if raw is not None:
                total = stats.totals(raw["layers"])
                report[name].update(total)
                report[name]["pools_by_buffer"] = raw["pools_by_buffer"]
                report[name]["read_bandwidth"] = raw["read_bandwidth"]
                report[name]["tier"] = raw["tier"]
                for key in ("ids_bytes", "bounce_bytes", "router_copy_bytes", "pool_bytes"):
                    report[name][key] = raw[key]
                # what `pymoe info --expert-budget` says of the same settings, nothing loaded
                report[name]["plan"] = memory_plan(spec["model"], pymoe.Settings(**kw))
    np.savez(sys.argv[2], **arrays)
    with open(sys.argv[2] + ".json", "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
