"""Command-line options shared by the verbs: loading a model and sampling."""

from __future__ import annotations

import argparse
import re
from typing import Any

from .model import Model
from .offload import DEFAULT_LO_THRESHOLD, OFFLOAD_MODES, PARTITIONS, POLICIES, TIERS


def add_model_args(parser: argparse.ArgumentParser, *, model_optional: bool = False) -> None:
    if model_optional:
        parser.add_argument("model", nargs="?", default=None, help="GGUF model file (default: the built-in demo model)")
    else:
        parser.add_argument("model", help="GGUF model file")
    g = parser.add_argument_group("model loading")
    g.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        default=0,
        metavar="N",
        help="context length in tokens (default: the model's, at most 4096)",
    )
    g.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=512,
        metavar="N",
        help="tokens per decode call when reading a prompt (default: %(default)s)",
    )
    g.add_argument("-t", "--threads", type=int, default=0, metavar="N", help="CPU threads (default: all)")
    g.add_argument(
        "-ngl",
        "--n-gpu-layers",
        type=int,
        default=-1,
        metavar="N",
        help="layers on the GPU in a GPU build (default: all)",
    )
    g.add_argument("--no-mmap", action="store_true", help="read the file into memory instead of mapping it")
    g.add_argument(
        "--no-repack",
        action="store_true",
        help="keep llama.cpp from repacking weights for its CPU kernels (offloaded experts never are)",
    )
    g.add_argument(
        "--cache-type",
        default="f16",
        metavar="TYPE",
        help="KV cache element type: f16, f32, q8_0 ... (default: %(default)s)",
    )
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's log and full error tracebacks")
    o = parser.add_argument_group("expert offload (MoE models)")
    o.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        default="auto",
        help="the expert cache: auto (on when the experts do not fit the budget), on, off (default: %(default)s)",
    )
    o.add_argument(
        "--expert-budget",
        default="auto",
        metavar="SIZE",
        help="fast memory for expert slots: 6GiB, 512MiB, a share like 0.5 or 50%%, or auto "
        "(free memory minus the rest of the model and the KV cache; default)",
    )
    o.add_argument("--policy", choices=POLICIES, default="lru", help="cache eviction policy (default: %(default)s)")
    o.add_argument(
        "--cache-partition",
        choices=PARTITIONS,
        default="layer",
        help="layer: a slot pool per layer; shared: one pool all layers compete for (default: %(default)s)",
    )
    o.add_argument(
        "--offload-tier",
        choices=TIERS,
        default="auto",
        help="disk: experts stay in the file (models bigger than RAM); host: experts in RAM; "
        "auto: host with a GPU, else disk (default)",
    )
    o.add_argument(
        "--no-cpu-assist",
        action="store_true",
        help="always load a missed expert into the cache instead of computing it where it lives",
    )
    o.add_argument(
        "--sidecar",
        metavar="PATH",
        help="low-precision expert copy for mixed precision (MODEL.lo.gguf from pymoe convert; 'auto': use it "
        "when it exists)",
    )
    o.add_argument(
        "--lo-share",
        type=float,
        default=0.25,
        metavar="S",
        help="share of the expert budget for low-precision slots (default: %(default)s)",
    )
    o.add_argument(
        "--lo-threshold",
        type=float,
        default=DEFAULT_LO_THRESHOLD,
        metavar="W",
        help="a pair whose gate weight, relative to its token's top-k sum, is below W may run in low precision "
        "(default: %(default)s, see docs/quality.md)",
    )
    o.add_argument(
        "--prefetch",
        action="store_true",
        help="predict the next layer's experts and load them while the current layer computes",
    )
    o.add_argument(
        "--prefetch-depth", type=int, default=1, metavar="N", help="layers ahead to predict (default: %(default)s)"
    )


def add_sampling_args(parser: argparse.ArgumentParser, *, temp: float = 0.8) -> None:
    g = parser.add_argument_group("sampling (llama.cpp's sampler chain)")
    g.add_argument(
        "--temp",
        type=float,
        default=temp,
        metavar="T",
        help="temperature; 0 is greedy and deterministic (default: %(default)s)",
    )
    g.add_argument("--top-k", type=int, default=40, metavar="K", help="keep the K most likely tokens; 0: off")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling; 1: off")
    g.add_argument(
        "--min-p", type=float, default=0.05, metavar="P", help="drop tokens below P times the top probability; 0: off"
    )
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R", help="1: off")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed (default: random)")


def model_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    for name in ("ctx_size", "batch_size", "threads"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    kw: dict[str, Any] = {
        "n_ctx": args.ctx_size,
        "n_batch": max(1, args.batch_size),
        "n_ubatch": max(1, args.batch_size),
        "n_threads": args.threads,
        "n_gpu_layers": args.n_gpu_layers,
        "use_mmap": not args.no_mmap,
        "repack": not args.no_repack,
        "cache_type": args.cache_type,
        "offload": args.offload,
        "expert_budget": budget_arg(args.expert_budget),
        "policy": args.policy,
        "cache_partition": args.cache_partition,
        "offload_tier": args.offload_tier,
        "cpu_assist": not args.no_cpu_assist,
        "sidecar": args.sidecar,
        "lo_share": args.lo_share,
        "lo_threshold": args.lo_threshold,
        "prefetch": args.prefetch,
        "prefetch_depth": args.prefetch_depth,
        "verbose": args.verbose,
    }
    kw.update(overrides)
    return kw


def budget_arg(text: str) -> str | float:
    """--expert-budget: a decimal fraction such as 0.5 is a share of the expert bytes; everything else
    (6GiB, 50%, auto, a byte count) is passed on as text."""
    t = text.strip()
    return float(t) if re.fullmatch(r"(0?\.[0-9]+|1\.0*)", t) else t


def load_model(args: argparse.Namespace, **overrides: Any) -> Model:
    return Model(args.model, **model_kwargs(args, **overrides))


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.seed is not None and not 0 <= args.seed < 2**32 - 1:
        raise ValueError("--seed must be in [0, 2**32 - 2]")
    return {
        "temperature": args.temp,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
    }
