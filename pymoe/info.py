"""`pymoe info`: what a GGUF file holds, read from its header (no weights are
loaded): architecture, expert counts, and bytes by quant type split into
expert and non-expert weights; and whether llama.cpp can load it (the checks
a model load runs first: metadata llama.cpp would abort on, weight types the
CPU cannot compute with). Exits 1 when it cannot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import _core
from . import settings as settings_mod
from ._units import format_bytes
from .gguf_info import GGUFSummary, load_problems, summarize
from .offload import auto_budget
from .settings import Settings

BUDGET_SETTINGS = (
    "expert_budget",
    "cache_partition",
    "offload_tier",
    "n_gpu_layers",
    "rpc",
    "n_ctx",
    "n_batch",
    "n_ubatch",
    "prefetch",
    "sidecar",
    "lo_share",
)


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe info")
    parser.description = __doc__
    parser.add_argument("model", help="GGUF model file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor")
    parser.add_argument("--verbose", action="store_true", help="full error tracebacks")
    settings_mod.add_arguments(parser, only=BUDGET_SETTINGS)
    parser.set_defaults(expert_budget=None)  # no budget given: no budget section
    parser.epilog = (
        "With --expert-budget (6GiB, 0.5, 50%, auto): how the engine would place it, per device with -ngl and "
        "--rpc, and the engine's own memory beside it (expert ids, read buffers, router copies); nothing is loaded."
    )
    return parser


def budget_split(s: GGUFSummary, budget: int | None, per_layer: bool = True) -> dict:
    """How a budget in bytes (None: auto) splits over the model's slot pools (the engine's own split,
    nothing allocated)."""
    if not s.is_moe:
        raise ValueError(f"'{s.path}' is a dense model: there are no experts to offload")
    if budget is None:
        budget = auto_budget(s, 4096)
    plan = _core.offload_plan(str(s.path), budget, per_layer=per_layer)
    slots = sum(p["n_slots"] for p in plan["pools"])
    experts = sum(p["n_experts"] for p in plan["pools"])
    return {
        "budget": budget,
        "allocated": plan["bytes"],
        "slots": slots,
        "experts": experts,
        "share_cached": slots / experts if experts else 0.0,
        "pools": plan["pools"],
    }


# what one io thread may hold: an 8 MiB read plus alignment slack (engine::stats in native/pymoe-engine.cpp)
READ_BUFFER_BYTES = (8 << 20) + 8192


def layer_devices(n_layer: int, n_gpu_layers: int, devices: list[dict]) -> list[int | None]:
    """The device (an index into `devices`) each repeating layer runs on, None for the CPU: the split
    llama.cpp makes by default (llama_model::load_tensors): the last `n_gpu_layers` of the layers and the
    output layer, cut in proportion to the devices' free memory."""
    if not devices or n_gpu_layers == 0:
        return [None] * n_layer
    n_all = n_layer + 1  # the output layer counts
    n_gpu = n_all if n_gpu_layers < 0 else min(n_gpu_layers, n_all)
    start = n_all - n_gpu
    cuts, acc = [], 0.0
    total = float(sum(int(d["free"]) for d in devices)) or 1.0
    for d in devices:
        acc += int(d["free"]) / total
        cuts.append(acc)
    out: list[int | None] = []
    for il in range(n_layer):
        if il < start:
            out.append(None)
            continue
        x = (il - start) / n_gpu
        out.append(min(next((i for i, c in enumerate(cuts) if c > x), len(cuts) - 1), len(cuts) - 1))
    return out


def memory_plan(path: str, settings: Settings) -> dict:
    """Where the engine's memory goes for `settings` (nothing loaded): the expert budget's slot pools and
    the expert ids per device (or host memory), and the engine's host-memory overhead: the direct branch's
    ids, the read buffers, the predictor's float copies of routers it cannot read in place. The same
    figures `Model.offload_stats()` reports after loading (tests/test_info.py holds them together)."""
    s = summarize(path)
    if not s.is_moe:
        raise ValueError(f"'{s.path}' is a dense model: there are no experts to offload")
    settings = settings.replace(offload="on")
    p, _, sidecar = settings.resolve(Path(path), s)
    o = p.offload
    tier, devices = settings.placement()
    devices = devices or []
    per_layer = settings.cache_partition == "layer"
    budget_lo = int(o.lo_share * o.budget) if sidecar else 0
    split = budget_split(s, o.budget - budget_lo, per_layer)
    pools = list(split["pools"])
    if sidecar:  # the low-precision copies' pools take their share of the budget
        lo = _core.offload_plan(str(sidecar), budget_lo, per_layer=per_layer)
        pools += lo["pools"]
        split["allocated"] += lo["bytes"]
        split["allocated_lo"] = lo["bytes"]
    split["budget"] = o.budget
    split["tier"] = tier
    placed = layer_devices(s.n_layer, settings.n_gpu_layers, devices)
    rows = settings.n_batch  # the largest ubatch the plan is written for (the ubatch is at most the batch)
    n_branches = 4 if sidecar else 2
    moe = set(s.moe_layers)
    per_dev = [
        {"name": d["name"], "endpoint": d["endpoint"], "free": int(d["free"]), "layers": [], "pool_bytes": 0}
        for d in devices
    ]
    host = {"name": "host", "layers": [], "pool_bytes": 0}
    for pool in pools:
        for il in pool["layers"]:
            dev = placed[il]
            target = host if dev is None else per_dev[dev]
            if il not in target["layers"]:  # a layer has a pool and maybe a low-precision one
                target["layers"].append(il)
            # exact for a pool per layer; a shared pool's slots are counted in proportion to its
            # layers (the engine gives each device's layers a class of their own, within a slot)
            target["pool_bytes"] += pool["n_slots"] * pool["slot_bytes"] // len(pool["layers"])
    for target in (*per_dev, host):
        n_moe = len([il for il in target["layers"] if il in moe])
        target["ids_bytes"] = n_moe * s.n_expert_used * n_branches * rows * 4
    direct_ids = len(moe) * s.n_expert_used * rows * 4
    loader = o.prefetch or (o.admission and bool(devices))
    io = o.io_threads * (2 if sidecar else 1) + (max(1, o.io_threads // 2) if loader else 0)
    stream = tier == "disk" and o.stream  # the direct branch's ring
    routers = 0
    if o.prefetch:  # the first MoE layer is never predicted
        for t in s.tensors:
            role = t.name.rsplit(".", 2)[-2] if t.name.count(".") >= 2 else ""
            router = t.layer in moe and t.layer != min(moe) and role in ("ffn_gate_inp", "exp_probs_b")
            if router and (placed[t.layer] is not None or t.type != "f32"):
                routers += 4 * int(np.prod(t.shape))
    split["devices"] = [d for d in per_dev if d["layers"]]
    split["host"] = {
        "pool_bytes": host["pool_bytes"],
        "ids_bytes": host["ids_bytes"] + direct_ids,
        "read_buffer_bytes": io * READ_BUFFER_BYTES + (_core.stream_ring_bytes(path) if stream else 0),
        "router_copy_bytes": routers,
    }
    split["overhead_bytes"] = sum(d["ids_bytes"] for d in per_dev) + sum(
        v for k, v in split["host"].items() if k != "pool_bytes"
    )
    return split


def span_of(layers: list[int]) -> str:
    """0-15 for a run of layers, the list otherwise."""
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)


def group_pools(pools: list[dict]) -> list[tuple[list[int], dict]]:
    """Consecutive per-layer pools of the same size as one line: [(layers, a pool)]."""
    out: list[tuple[list[int], dict]] = []
    for p in pools:
        prev = out[-1][1] if out else None
        if (
            prev is not None
            and len(p["layers"]) == len(prev["layers"]) == 1
            and all(p[k] == prev[k] for k in ("n_slots", "slot_bytes", "n_experts"))
        ):
            out[-1][0].extend(p["layers"])
        else:
            out.append((list(p["layers"]), p))
    return out


def cpu_note() -> str:
    """The CPU's extra buffer types (where llama.cpp repacks weights) and the AMX build setting."""
    bufts = ", ".join(_core.cpu_extra_buffer_types()) or "none"
    amx = "on" if _core.build_cpu_amx() else "off (build option PYMOE_CPU_AMX)"
    return f"repacking into {bufts}; AMX {amx}"


def main(args: argparse.Namespace) -> int:
    s = summarize(args.model)
    problems = load_problems(args.model)
    split = None
    if args.expert_budget is not None and not problems:  # no plan for a file the engine would refuse
        split = memory_plan(args.model, settings_mod.from_args(args))
    if args.json:
        d = s.as_dict()
        d["problems"] = problems
        d["cpu_extra_buffer_types"] = _core.cpu_extra_buffer_types()
        if args.tensors:
            d["tensors"] = [t.__dict__ for t in s.tensors]
        if split:
            d["expert_budget"] = split
        print(json.dumps(d, indent=2, default=str))
        return 1 if problems else 0
    total = s.expert_bytes + s.other_bytes
    print(f"file          {s.path} ({format_bytes(s.file_size)})")
    print(f"name          {s.name or '-'}")
    print(f"architecture  {s.architecture}, {s.n_layer} layers")
    if s.is_moe:
        shared = f", {s.n_expert_shared} shared" if s.n_expert_shared else ""
        print(
            f"experts       {s.n_expert} per layer, {s.n_expert_used} used per token{shared}; "
            f"{len(s.moe_layers)} MoE layers"
        )
        print(f"one expert    {format_bytes(s.bytes_per_expert)} (all its projections in one layer)")
    else:
        print("experts       none: a dense model, there are no experts to offload")
    print(
        f"weights       {format_bytes(total)}: experts {format_bytes(s.expert_bytes)} "
        f"({s.expert_bytes / max(total, 1):.1%}), other {format_bytes(s.other_bytes)}"
    )
    print()
    print(f"{'type':<10}{'experts':>14}{'other':>14}{'total':>14}")
    for typ, b in s.bytes_by_type().items():
        cells = (format_bytes(b["expert"]), format_bytes(b["other"]), format_bytes(b["expert"] + b["other"]))
        print(f"{typ:<10}" + "".join(f"{c:>14}" for c in cells))
    if split:
        print()
        print(
            f"budget        {format_bytes(split['budget'])}: {split['slots']} of {split['experts']} experts "
            f"({split['share_cached']:.0%}) in slots, {format_bytes(split['allocated'])} allocated"
        )
        for layers, p in group_pools(split["pools"]):
            span = span_of(layers)
            each = " each" if len(layers) > 1 and len(p["layers"]) == 1 else ""
            print(
                f"  layers {span}: {p['n_slots']} slots{each} of {format_bytes(p['slot_bytes'])} "
                f"({p['n_slots'] / p['n_experts']:.0%} of {p['n_experts']} experts)"
            )
        for d in split["devices"]:
            where = f"{d['name']} ({d['endpoint']})" if d["endpoint"] else d["name"]
            print(
                f"  on {where}: layers {span_of(d['layers'])}, slots {format_bytes(d['pool_bytes'])} + expert ids "
                f"{format_bytes(d['ids_bytes'])} of {format_bytes(d['free'])} free"
            )
        h = split["host"]
        print(
            f"engine memory {format_bytes(split['overhead_bytes'])} beside the budget: expert ids "
            f"{format_bytes(h['ids_bytes'] + sum(d['ids_bytes'] for d in split['devices']))}, read buffers "
            f"{format_bytes(h['read_buffer_bytes'])}, router copies {format_bytes(h['router_copy_bytes'])}"
        )
    if args.tensors:
        print()
        for t in s.tensors:
            flag = "E" if t.is_expert else " "
            print(f"{flag} {t.name:<40} {t.type:<8} {list(t.shape)!s:<24} {format_bytes(t.nbytes):>12}")
    print()
    print(f"cpu           {cpu_note()}")
    if problems:
        for p in problems:
            print(f"error: '{s.path}' cannot be loaded: {p}", file=sys.stderr)
        print(
            "hint: the file's metadata or tensor types are corrupt or inconsistent; convert or download it again",
            file=sys.stderr,
        )
        return 1
    return 0
