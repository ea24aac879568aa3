"""`pymoe info`: what a GGUF file holds, read from its header (no weights are
loaded): architecture, expert counts, and bytes by quant type split into
expert and non-expert weights."""

from __future__ import annotations

import argparse
import json

from . import _core
from ._args import budget_arg
from ._units import format_bytes
from .gguf_info import GGUFSummary, summarize
from .offload import PARTITIONS, auto_budget, check_partition, parse_budget


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe info")
    parser.description = __doc__
    parser.add_argument("model", help="GGUF model file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor")
    parser.add_argument(
        "--expert-budget",
        metavar="SIZE",
        help="show how this expert budget (6GiB, 0.5, 50%%, auto) would split over the slot pools",
    )
    parser.add_argument(
        "--cache-partition",
        choices=PARTITIONS,
        default="layer",
        help="the split for --expert-budget: a pool per layer or one shared (default: %(default)s)",
    )
    parser.add_argument("--verbose", action="store_true", help="full error tracebacks")
    return parser


def budget_split(s: GGUFSummary, budget_text: str, per_layer: bool = True) -> dict:
    """How a budget splits over the model's slot pools (the engine's own split, nothing allocated)."""
    if not s.is_moe:
        raise ValueError(f"'{s.path}' is a dense model: there are no experts to offload")
    budget = parse_budget(budget_arg(budget_text), s.expert_bytes)
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


def main(args: argparse.Namespace) -> int:
    s = summarize(args.model)
    split = budget_split(s, args.expert_budget, check_partition(args.cache_partition)) if args.expert_budget else None
    if args.json:
        d = s.as_dict()
        if args.tensors:
            d["tensors"] = [t.__dict__ for t in s.tensors]
        if split:
            d["expert_budget"] = split
        print(json.dumps(d, indent=2, default=str))
        return 0
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
            span = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
            each = " each" if len(layers) > 1 and len(p["layers"]) == 1 else ""
            print(
                f"  layers {span}: {p['n_slots']} slots{each} of {format_bytes(p['slot_bytes'])} "
                f"({p['n_slots'] / p['n_experts']:.0%} of {p['n_experts']} experts)"
            )
    if args.tensors:
        print()
        for t in s.tensors:
            flag = "E" if t.is_expert else " "
            print(f"{flag} {t.name:<40} {t.type:<8} {list(t.shape)!s:<24} {format_bytes(t.nbytes):>12}")
    return 0
