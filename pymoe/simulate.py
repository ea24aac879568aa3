"""`pymoe simulate`: replay a routing trace through the engine's own cache,
eviction policies and planner (the native code, not a copy), with a modelled
link and compute, and report hit rate, bytes moved per token and modelled
latency per token, beside the optimal offline policy's hit rate (Belady's
bound: evict the expert used again farthest in the future).

A trace is a routing record of a real run (``pymoe generate ... --record-routing
FILE``: it also knows the expert size and, with ``--prefetch``, the predictor's
guesses, whose background loads are modelled) or one of the trace formats
pymoe.traces reads. The model behind a trace that is not a recording is
described by a preset (picked from the trace's routing shape) or by
--expert-bytes. The latency model is for decode, where expert matmuls are
memory-bound: computing one token on an expert costs its bytes / the memory
bandwidth of where it runs (--device-gbps for slots, --cpu-gbps for experts
computed where they live), and loading it costs its bytes / --link-gbps.
Attention and the rest of a layer are left out unless --layer-ms is given."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import _core, stats
from ._units import MiB
from .offload import DEFAULT_LO_THRESHOLD, PARTITIONS, check_partition, parse_budget
from .settings import Settings
from .traces import Trace, load_trace

# the engine's defaults (offload_params in native/pymoe.h)
DEFAULT_POLICY = _core.ModelParams().offload.policy
DEFAULT_SKIP_THRESHOLD = round(_core.ModelParams().offload.skip_threshold, 6)
BOUND_POLICY = "belady"
LO_BITS = {"q2_K": 2.625, "q3_K": 3.4375, "q4_0": 4.5, "q4_K": 4.5, "q8_0": 8.5}


@dataclass(frozen=True)
class Preset:
    name: str
    n_embd: int
    n_ff: int
    n_expert: int
    k: int
    hi_bits: float = 4.5  # q4_K
    n_layer: int = 0  # the model's MoE layers (0: as many as the trace has)

    def expert_params(self) -> int:
        return 3 * self.n_embd * self.n_ff  # gate, up, down

    def expert_bytes(self, bits: float | None = None) -> int:
        return int(self.expert_params() * (bits or self.hi_bits) / 8)


PRESETS = {
    p.name: p
    for p in (
        Preset("mixtral-8x7b", 4096, 14336, 8, 2, n_layer=32),
        Preset("qwen1.5-moe-a2.7b", 2048, 1408, 60, 4, n_layer=24),
        Preset("olmoe-1b-7b", 2048, 1024, 64, 8, n_layer=16),
        Preset("qwen3-30b-a3b", 2048, 768, 128, 8, n_layer=48),
    )
}


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe simulate")
    parser.description = __doc__
    parser.add_argument(
        "--trace",
        nargs="+",
        required=True,
        metavar="FILE",
        help="a routing trace (several files: route logs of several layers of one run)",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the traced model (default: from the trace)")
    parser.add_argument("--expert-bytes", type=int, metavar="N", help="bytes of one expert (overrides the preset)")
    parser.add_argument(
        "--budget",
        default="0.25",
        metavar="SIZE",
        help="slots for this share of all experts (0.25), or bytes (6GiB) (default: %(default)s)",
    )
    parser.add_argument(
        "--policy",
        choices=sorted(_core.policy_names()),
        default=DEFAULT_POLICY,
        help="eviction policy; belady is the optimal offline one, the bound printed beside every run "
        "(default: %(default)s, the engine's)",
    )
    parser.add_argument(
        "--cache-partition",
        choices=PARTITIONS,
        default="layer",
        help="layer: a slot pool per layer (as the engine by default); shared: one pool for all layers "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--lo-type",
        choices=sorted(LO_BITS),
        default=None,
        help="simulate mixed precision with low-precision copies of this type",
    )
    parser.add_argument("--lo-share", type=float, default=0.25, help="share of the budget for low slots")
    parser.add_argument(
        "--lo-threshold",
        type=float,
        default=DEFAULT_LO_THRESHOLD,
        help="relative gate weight (over the token's top-k sum) below which low precision is used "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--skip-threshold",
        type=float,
        default=DEFAULT_SKIP_THRESHOLD,
        metavar="T",
        help="adaptive top-k, as the engine's --skip-threshold: a miss whose relative gate weight is below T for "
        "every token of the step is neither loaded nor computed (default: %(default)s, never)",
    )
    parser.add_argument("--no-cpu-assist", action="store_true", help="never compute a miss where it lives")
    parser.add_argument(
        "--no-admission",
        action="store_true",
        help="do not upload misses computed on the CPU into the cache in the background",
    )
    parser.add_argument("--link-gbps", type=float, default=16.0, help="slot loads, GB/s (default: %(default)s)")
    parser.add_argument(
        "--device-gbps",
        type=float,
        default=300.0,
        help="memory bandwidth where slots compute, GB/s (default: %(default)s)",
    )
    parser.add_argument(
        "--cpu-gbps",
        type=float,
        default=40.0,
        help="memory bandwidth of the CPU computing an expert in place, GB/s (default: %(default)s)",
    )
    parser.add_argument("--layer-ms", type=float, default=0.0, help="the rest of a layer per token, ms")
    parser.add_argument(
        "--no-prefetch",
        action="store_true",
        help="ignore the predictor's guesses of a recording (by default their background loads are modelled)",
    )
    parser.add_argument("--skip-rows", type=int, default=None, help="drop leading rows of route logs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the hit rate against the budget for every policy, Belady's bound dashed (needs matplotlib)",
    )
    return parser


@dataclass(frozen=True)
class SimResult:
    """What one simulation measured (`simulate`)."""

    trace: str
    preset: str  # the model the bytes and the compute are modelled on ("custom": --expert-bytes only)
    tokens: int
    layers: int
    policy: str
    budget_bytes: int
    share_cached: float  # of the expert bytes, high and low slots
    n_slots: int
    n_slots_lo: int
    lo_type: str | None
    hit_rate: float
    lo_share_of_pairs: float
    bytes_per_token: float  # moved into slots
    latency_per_token_s: float  # modelled, the expert part only
    loads: int
    loads_lo: int
    direct: int
    upgrades: int
    admissions: int  # misses also uploaded into the cache in the background
    admitted_per_token: float  # bytes of those uploads (off the critical path)
    link_utilisation: float  # share of the modelled time the link was moving loads and uploads (<= 1)
    prefetch_loads: int = 0  # guessed experts loaded in the background (a recording made with --prefetch)
    prefetch_hits: int = 0  # hits on an expert a prefetch brought, at its first use
    prefetch_wait_per_token_s: float = 0.0  # steps waiting for their experts' background loads (exposed)
    bound_hit_rate: float | None = None  # Belady's (optimal offline) hit rate with the same settings, when asked
    skipped: int = 0  # misses left out by skip_threshold (adaptive top-k): neither moved nor computed
    skipped_share_of_pairs: float = 0.0  # the share of all pairs they were

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate(
    trace: Trace | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    budget: str | float | int = 0.25,
    policy: str = DEFAULT_POLICY,
    preset: str | None = None,
    expert_bytes: int | None = None,
    cache_partition: str = "layer",
    lo_type: str | None = None,
    lo_share: float = 0.25,
    lo_threshold: float = DEFAULT_LO_THRESHOLD,
    skip_threshold: float = DEFAULT_SKIP_THRESHOLD,
    cpu_assist: bool = True,
    link_gbps: float = 16.0,
    device_gbps: float = 300.0,
    cpu_gbps: float = 40.0,
    layer_ms: float = 0.0,
    skip_rows: int | None = None,
    admission: bool = True,
    prefetch: bool = True,
    bound: bool = False,
) -> SimResult:
    """Replays `trace` (a `Trace`, or the file(s) `load_trace` reads with `skip_rows`)
    through the engine's cache, `policy` and planner.

    `budget` is a share of all experts (a float, or "25%") or bytes (an int, "6GiB");
    `preset` names the traced model (default: a recording's own expert size, else the
    preset with the trace's routing shape) and `expert_bytes` overrides its expert size.
    `lo_type` simulates low-precision copies of that type (LO_BITS) in `lo_share` of the
    budget, used below `lo_threshold`. `skip_threshold`: the engine's adaptive top-k (a miss
    of smaller relative gate weight is left out). The bandwidths model decode (see the module's doc).
    `admission`: misses computed on the CPU are also uploaded into the cache while the
    link is idle (the engine's background admission). `prefetch`: a recording's
    predictor guesses are loaded in the background. `bound`: also run Belady's optimal
    offline policy with the same settings (`bound_hit_rate`)."""
    Settings(skip_threshold=skip_threshold)  # the engine's range check and message
    if not isinstance(trace, Trace):
        trace = load_trace(trace, skip_rows=skip_rows)
    if policy not in _core.policy_names():
        raise ValueError(f"unknown policy '{policy}'; hint: one of {', '.join(sorted(_core.policy_names()))}")
    model = _model_of(trace, preset, expert_bytes)
    if lo_type is not None and lo_type not in LO_BITS:
        raise ValueError(f"unknown low-precision type '{lo_type}'; hint: one of {', '.join(sorted(LO_BITS))}")
    hi = expert_bytes or (trace.expert_bytes if not preset and trace.expert_bytes else 0) or model.expert_bytes()
    bits = 8.0 * hi / model.expert_params() if model.expert_params() else model.hi_bits
    lo = int(hi * LO_BITS[lo_type] / bits) if lo_type else 0
    n_layer = len(trace.layers)
    total = hi * n_layer * trace.n_expert
    budget_bytes = parse_budget(budget, total)
    if budget_bytes is None:
        raise ValueError("an 'auto' budget has no meaning for a simulation; hint: give a share (0.25) or a size (6GiB)")
    # decode is memory-bound: an expert's token costs its bytes / bandwidth; as FLOP rates:
    flops = 2.0 * model.expert_params() if model.name != "custom" else 2.0 * hi
    per_byte = flops / hi

    def run(policy: str) -> dict[str, Any]:
        sim = _core.CacheSimulator(
            n_layer, trace.n_expert, hi, expert_bytes_lo=lo, budget=budget_bytes, lo_share=lo_share,
            lo_threshold=lo_threshold if lo else 0.0, policy=policy,
            per_layer=check_partition(cache_partition),
            assist=cpu_assist, link_bw=link_gbps * 1e9, direct_bw=0.0,
            fast_flops=device_gbps * 1e9 * per_byte, slow_flops=cpu_gbps * 1e9 * per_byte,
            flops_per_token=flops, layer_seconds=layer_ms / 1e3, admission=admission, prefetch=prefetch,
            horizon_scale=max(1.0, model.n_layer / n_layer), skip_threshold=skip_threshold,
        )  # fmt: skip
        sim.run(trace.experts, trace.weights, ubatches=trace.ubatches, guesses=trace.guesses)
        return sim.result()

    r = run(policy)
    bound_rate = None
    if bound:
        bound_rate = stats.hit_rate(r if policy == BOUND_POLICY else run(BOUND_POLICY)) or 0.0
    tokens = r["tokens"]
    return SimResult(
        trace=trace.name,
        preset=model.name,
        tokens=tokens,
        layers=n_layer,
        policy=policy,
        budget_bytes=budget_bytes,
        share_cached=(r["n_slots"] * hi + r["n_slots_lo"] * lo) / total if total else 0.0,
        n_slots=r["n_slots"],
        n_slots_lo=r["n_slots_lo"],
        lo_type=lo_type,
        hit_rate=stats.hit_rate(r) or 0.0,
        lo_share_of_pairs=r["lo_pairs"] / r["pairs"] if r["pairs"] else 0.0,
        bytes_per_token=r["bytes_moved"] / tokens if tokens else 0.0,
        latency_per_token_s=r["seconds"] / tokens if tokens else 0.0,
        loads=r["loads"],
        loads_lo=r["loads_lo"],
        direct=r["direct"],
        upgrades=r["upgrades"],
        admissions=r["admissions"],
        admitted_per_token=r["bytes_admitted"] / tokens if tokens else 0.0,
        link_utilisation=r["link_busy_seconds"] / r["seconds"] if r["seconds"] else 0.0,
        prefetch_loads=r["prefetch_loads"],
        prefetch_hits=r["prefetch_hits"],
        prefetch_wait_per_token_s=r["prefetch_wait_seconds"] / tokens if tokens else 0.0,
        bound_hit_rate=bound_rate,
        skipped=r["skipped"],
        skipped_share_of_pairs=r["skipped_pairs"] / r["pairs"] if r["pairs"] else 0.0,
    )


def _model_of(trace: Trace, preset: str | None, expert_bytes: int | None) -> Preset:
    """The model a trace's bytes and compute are modelled on."""
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; hint: one of {', '.join(sorted(PRESETS))}")
        return PRESETS[preset]
    if trace.expert_bytes and trace.expert_params:
        # a recording knows its model: one expert's parameters as a 1 x n "projection"
        bits = 8.0 * trace.expert_bytes / trace.expert_params
        return Preset(trace.model or trace.name, 1, trace.expert_params // 3 or 1, trace.n_expert, trace.k, bits)
    match = [p for p in PRESETS.values() if (p.n_expert, p.k) == (trace.n_expert, trace.k)]
    if not match and not expert_bytes:
        raise ValueError(
            f"no preset routes top-{trace.k} of {trace.n_expert} experts; "
            "hint: give the expert size (--expert-bytes) and a preset for the compute model (--preset)"
        )
    return match[0] if match else Preset("custom", 1, 1, trace.n_expert, trace.k)


def hit_rate_curves(
    trace: Trace, policies: Sequence[str], shares: Sequence[float], **kwargs: Any
) -> dict[str, list[float]]:
    """The hit rate of every policy at every budget (`shares` of all experts); the
    other arguments as `simulate` takes them."""
    return {p: [simulate(trace, budget=float(b), policy=p, **kwargs).hit_rate for b in shares] for p in policies}


# the online policies a model can run (static needs a profile), and the bound
PLOT_POLICIES = ("lru", "lfu", "multidim", "lrfu", "markov", BOUND_POLICY)


def plot_hit_rates(curves: dict[str, list[float]], shares: Sequence[float], path: str, title: str) -> None:
    """Hit rate against budget, one line per policy, Belady's bound dashed."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib; hint: pip install matplotlib (or pymoe[plot])") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [100.0 * b for b in shares]
    for name, ys in curves.items():
        bound = name == BOUND_POLICY
        ax.plot(
            xs, ys, "--" if bound else "-", marker=None if bound else "o", ms=3, color="black" if bound else None,
            label=f"{name} (optimal, offline)" if bound else name,
        )  # fmt: skip
    ax.set_xlabel("expert budget (% of all experts cached)")
    ax.set_ylabel("hit rate")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_value(text: str) -> str | float:
    """--budget: a number with a decimal point is a share of all experts, anything else a size
    (6GiB, 6.5GiB, 25%, a byte count)."""
    try:
        return float(text) if "." in text else text
    except ValueError:
        return text  # 6.5GiB


def main(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace, skip_rows=args.skip_rows)
    options: dict[str, Any] = {
        "preset": args.preset,
        "expert_bytes": args.expert_bytes,
        "cache_partition": args.cache_partition,
        "lo_type": args.lo_type,
        "lo_share": args.lo_share,
        "lo_threshold": args.lo_threshold,
        "skip_threshold": args.skip_threshold,
        "cpu_assist": not args.no_cpu_assist,
        "link_gbps": args.link_gbps,
        "device_gbps": args.device_gbps,
        "cpu_gbps": args.cpu_gbps,
        "layer_ms": args.layer_ms,
        "admission": not args.no_admission,
        "prefetch": not args.no_prefetch,
    }
    res = simulate(trace, budget=budget_value(args.budget), policy=args.policy, bound=True, **options)
    if args.plot:
        shares = [i / 20 for i in range(1, 21)]
        curves = hit_rate_curves(trace, PLOT_POLICIES, shares, **options)
        mode = "CPU assist + admission" if options["cpu_assist"] and options["admission"] else (
            "CPU assist" if options["cpu_assist"] else "every miss loaded"
        )  # fmt: skip
        plot_hit_rates(curves, shares, args.plot, f"{trace.name}\n{res.tokens} tokens, {res.preset}; {mode}")
    if args.json:
        print(json.dumps(res.as_dict()))
        return 0
    print(f"trace {res.trace} ({res.tokens} tokens, {res.layers} layers) as {res.preset}")
    print(
        f"policy {res.policy}, {res.n_slots} slots"
        + (f" + {res.n_slots_lo} {res.lo_type} slots" if res.lo_type else "")
        + f" ({res.share_cached:.0%} of the expert bytes)"
    )
    print(
        f"hit rate {res.hit_rate:.3f} (optimal offline, Belady: {res.bound_hit_rate:.3f}), "
        f"low-precision pairs {res.lo_share_of_pairs:.1%}"
    )
    print(
        f"moved {res.bytes_per_token / MiB:.1f} MiB/token, modelled {res.latency_per_token_s * 1e3:.2f} "
        "ms/token (expert part)"
    )
    if res.skipped:
        print(f"skipped {res.skipped} missed experts: {res.skipped_share_of_pairs:.1%} of the pairs left out")
    if res.admissions:
        print(
            f"admitted {res.admissions} experts in the background ({res.admitted_per_token / MiB:.1f} MiB/token), "
            f"link busy {res.link_utilisation:.0%} of the time"
        )
    if res.prefetch_loads:
        print(
            f"prefetched {res.prefetch_loads} guessed experts, {res.prefetch_hits} of them hits; "
            f"waited {res.prefetch_wait_per_token_s * 1e3:.2f} ms/token for background loads"
        )
    if args.plot:
        print(f"plot: {args.plot}")
    return 0
