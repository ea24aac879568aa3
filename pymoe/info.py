"""`pymoe info`: what a GGUF file holds, read from its header (no weights are
loaded): architecture, expert counts, and bytes by quant type split into
expert and non-expert weights."""

from __future__ import annotations

import argparse
import json

from .gguf_info import summarize


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe info")
    parser.description = __doc__
    parser.add_argument("model", help="GGUF model file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor")
    parser.add_argument("--verbose", action="store_true", help="full error tracebacks")
    return parser


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def main(args: argparse.Namespace) -> int:
    s = summarize(args.model)
    if args.json:
        d = s.as_dict()
        if args.tensors:
            d["tensors"] = [t.__dict__ for t in s.tensors]
        print(json.dumps(d, indent=2, default=str))
        return 0
    total = s.expert_bytes + s.other_bytes
    print(f"file          {s.path} ({human(s.file_size)})")
    print(f"name          {s.name or '-'}")
    print(f"architecture  {s.architecture}, {s.n_layer} layers")
    if s.is_moe:
        shared = f", {s.n_expert_shared} shared" if s.n_expert_shared else ""
        print(
            f"experts       {s.n_expert} per layer, {s.n_expert_used} used per token{shared}; "
            f"{len(s.moe_layers)} MoE layers"
        )
        print(f"one expert    {human(s.bytes_per_expert)} (all its projections in one layer)")
    else:
        print("experts       none: a dense model, there are no experts to offload")
    print(
        f"weights       {human(total)}: experts {human(s.expert_bytes)} ({s.expert_bytes / max(total, 1):.1%}), "
        f"other {human(s.other_bytes)}"
    )
    print()
    print(f"{'type':<10}{'experts':>14}{'other':>14}{'total':>14}")
    for typ, b in s.bytes_by_type().items():
        print(f"{typ:<10}{human(b['expert']):>14}{human(b['other']):>14}{human(b['expert'] + b['other']):>14}")
    if args.tensors:
        print()
        for t in s.tensors:
            flag = "E" if t.is_expert else " "
            print(f"{flag} {t.name:<40} {t.type:<8} {list(t.shape)!s:<24} {human(t.nbytes):>12}")
    return 0
