"""`pymoe.Settings`: how a model is loaded and how its experts are served.

One frozen object, one place: the defaults of the native settings come from
the C++ structs (`model_params` / `offload_params` in native/pymoe.h, bound as
`_core.ModelParams`), the CLI's flags and their help are derived from the
fields' metadata (`add_arguments`, `from_args`), and `Model` takes the object.
Adding a setting is one field here (and one in pymoe.h if the engine needs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _core
from .gguf_info import GGUFSummary
from .offload import (
    DEFAULT_LO_THRESHOLD,
    OFFLOAD_MODES,
    PARTITIONS,
    POLICIES,
    TIERS,
    OffloadConfig,
    gpu_devices,
    resolve_sidecar,
    resolve_tier,
)

_NATIVE = _core.ModelParams()  # the C++ defaults

LOADING = "model loading"
OFFLOAD = "expert offload (MoE models)"


def budget_arg(text: str | float | int) -> str | float | int:
    """--expert-budget: a decimal fraction such as 0.5 is a share of the expert bytes; everything else
    (6GiB, 50%, auto, a byte count) is passed on as text (and a number as it is)."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    return float(t) if re.fullmatch(r"(0?\.[0-9]+|1\.0*)", t) else t


def _opt(
    *flags: str,
    help: str,
    group: str = LOADING,
    negate: bool = False,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    type: Any = None,
) -> dict[str, Any]:
    """Field metadata: how the setting appears on the command line (`flags` empty: Python only).
    negate: a boolean that is on by default and turned off by its flag (--no-mmap)."""
    return {
        "flags": flags,
        "help": help,
        "group": group,
        "negate": negate,
        "metavar": metavar,
        "choices": choices,
        "type": type,
    }


def _py_only(help: str) -> dict[str, Any]:
    return _opt(help=help)


@dataclass(frozen=True)
class Settings:
    """How a model is loaded and how its experts are served.

    ``Model(path, Settings(n_ctx=4096, expert_budget="6GiB"))``, or the same
    as keyword arguments: ``Model(path, n_ctx=4096, expert_budget="6GiB")``.
    Every field is documented by its ``help`` (``pymoe chat --help`` prints
    the same text); ``Settings.describe()`` lists them.
    """

    # --- model loading
    n_ctx: int = field(
        default=_NATIVE.n_ctx,
        metadata=_opt(
            "-c", "--ctx-size", metavar="N", help="context length in tokens (default: the model's, at most 4096)"
        ),
    )
    n_batch: int = field(
        default=_NATIVE.n_batch,
        metadata=_opt(
            "-b",
            "--batch-size",
            metavar="N",
            help="tokens per decode call when reading a prompt (default: %(default)s)",
        ),
    )
    n_ubatch: int = field(
        default=_NATIVE.n_ubatch,
        metadata=_opt(
            "-ub",
            "--ubatch-size",
            metavar="N",
            help="tokens per graph evaluation, at most the batch size (default: %(default)s)",
        ),
    )
    n_threads: int = field(
        default=_NATIVE.n_threads, metadata=_opt("-t", "--threads", metavar="N", help="CPU threads (default: all)")
    )
    n_gpu_layers: int = field(
        default=_NATIVE.n_gpu_layers,
        metadata=_opt("-ngl", "--n-gpu-layers", metavar="N", help="layers on the GPU in a GPU build (default: all)"),
    )
    use_mmap: bool = field(
        default=_NATIVE.use_mmap,
        metadata=_opt("--no-mmap", negate=True, help="read the file into memory instead of mapping it"),
    )
    repack: bool = field(
        default=_NATIVE.repack,
        metadata=_opt(
            "--no-repack",
            negate=True,
            help="keep llama.cpp from repacking weights for its CPU kernels (offloaded experts never are); "
            "pass it for a reference that sums exactly as the engine does",
        ),
    )
    flash_attn: bool = field(default=_NATIVE.flash_attn, metadata=_opt("--flash-attn", help="use flash attention"))
    cache_type: str = field(
        default=_NATIVE.cache_type,
        metadata=_opt(
            "--cache-type", metavar="TYPE", help="KV cache element type: f16, f32, q8_0 ... (default: %(default)s)"
        ),
    )
    rpc: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "--rpc",
            metavar="HOST:PORT,...",
            type=lambda text: tuple(x.strip() for x in text.split(",") if x.strip()),
            help="ggml RPC servers (`pymoe rpc-server`) whose devices are used like GPUs: layers (-ngl) and expert "
            "slots on them",
        ),
    )
    verbose: bool = field(
        default=False, metadata=_opt("--verbose", help="show llama.cpp's log and full error tracebacks")
    )

    # --- expert offload
    offload: str = field(
        default="auto",
        metadata=_opt(
            "--offload",
            group=OFFLOAD,
            choices=OFFLOAD_MODES,
            help="the expert cache: auto (on when the experts do not fit the budget), on, off (default: %(default)s)",
        ),
    )
    expert_budget: str | float | int | None = field(
        default="auto",
        metadata=_opt(
            "--expert-budget",
            group=OFFLOAD,
            metavar="SIZE",
            type=budget_arg,
            help="fast memory for expert slots: 6GiB, 512MiB, a share like 0.5 or 50%%, or auto "
            "(free memory minus the rest of the model and the KV cache; default)",
        ),
    )
    policy: str = field(
        default=_NATIVE.offload.policy,
        metadata=_opt(
            "--policy",
            group=OFFLOAD,
            choices=POLICIES,
            help="cache eviction policy; static needs `profile` (default: %(default)s)",
        ),
    )
    cache_partition: str = field(
        default="layer" if _NATIVE.offload.per_layer else "shared",
        metadata=_opt(
            "--cache-partition",
            group=OFFLOAD,
            choices=PARTITIONS,
            help="layer: a slot pool per layer; shared: one pool all layers compete for (default: %(default)s)",
        ),
    )
    offload_tier: str = field(
        default="auto",
        metadata=_opt(
            "--offload-tier",
            group=OFFLOAD,
            choices=TIERS,
            help="disk: experts stay in the file (models bigger than RAM); host: experts in RAM; "
            "auto: host with a GPU, else disk (default)",
        ),
    )
    cpu_assist: bool = field(
        default=_NATIVE.offload.cpu_assist,
        metadata=_opt(
            "--no-cpu-assist",
            group=OFFLOAD,
            negate=True,
            help="always load a missed expert into the cache instead of computing it where it lives",
        ),
    )
    sidecar: str | os.PathLike[str] | None = field(
        default=None,
        metadata=_opt(
            "--sidecar",
            group=OFFLOAD,
            metavar="PATH",
            help="low-precision expert copy for mixed precision (MODEL.lo.gguf from pymoe convert; 'auto': use it "
            "when it exists)",
        ),
    )
    lo_share: float = field(
        default=_NATIVE.offload.lo_share,
        metadata=_opt(
            "--lo-share",
            group=OFFLOAD,
            type=float,
            metavar="S",
            help="share of the expert budget for low-precision slots (default: %(default)s)",
        ),
    )
    lo_threshold: float = field(
        default=DEFAULT_LO_THRESHOLD,
        metadata=_opt(
            "--lo-threshold",
            group=OFFLOAD,
            type=float,
            metavar="W",
            help="a pair whose gate weight, relative to its token's top-k sum, is below W may run in low precision "
            "(default: %(default)s, see docs/quality.md)",
        ),
    )
    prefetch: bool = field(
        default=_NATIVE.offload.prefetch,
        metadata=_opt(
            "--prefetch",
            group=OFFLOAD,
            help="predict the next layer's experts and load them while the current layer computes",
        ),
    )
    prefetch_depth: int = field(
        default=_NATIVE.offload.prefetch_depth,
        metadata=_opt(
            "--prefetch-depth", group=OFFLOAD, metavar="N", help="layers ahead to predict (default: %(default)s)"
        ),
    )

    admission: bool = field(
        default=_NATIVE.offload.admission,
        metadata=_opt(
            "--no-admission",
            group=OFFLOAD,
            negate=True,
            help="with slots on a GPU (or an RPC device): do not upload missed experts into the cache in the "
            "background while the link is idle (they are then only computed where they live)",
        ),
    )

    stream: bool = field(
        default=_NATIVE.offload.stream,
        metadata=_opt(
            "--no-stream",
            group=OFFLOAD,
            negate=True,
            help="disk tier: compute missed experts from llama.cpp's mapping of the file (page faults) instead "
            "of reading them ahead of the CPU, with large uncached reads, into a ring of buffers",
        ),
    )

    record_routing: str | os.PathLike[str] | None = field(
        default=None,
        metadata=_opt(
            "--record-routing",
            group=OFFLOAD,
            metavar="FILE",
            help="write this run's routing to FILE (per step and MoE layer: the chosen experts, their gate weights "
            "and, with --prefetch, the predictor's guesses) for `pymoe simulate --trace FILE`; it needs the expert "
            "engine, which --offload auto then turns on",
        ),
    )
    skip_threshold: float = field(
        default=_NATIVE.offload.skip_threshold,
        metadata=_opt(
            "--skip-threshold",
            group=OFFLOAD,
            type=float,
            metavar="T",
            help="adaptive top-k, lossy: a missed expert (in no slot) whose gate weight, relative to its token's "
            "top-k sum, is below T for every token of the step is skipped instead of read and computed; "
            "0: never (default: %(default)s; docs/benchmarks.md measures 0.05-0.2)",
        ),
    )
    skip_renormalize: bool = field(
        default=_NATIVE.offload.skip_renormalize,
        metadata=_opt(
            "--skip-renormalize",
            group=OFFLOAD,
            help="with --skip-threshold: scale the kept experts' weights back up to the token's top-k sum",
        ),
    )

    # --- Python only (no flag)
    direct_io: bool = field(
        default=_NATIVE.offload.direct_io, metadata=_py_only("read slots with O_DIRECT (disk tier)")
    )
    io_threads: int = field(default=_NATIVE.offload.io_threads, metadata=_py_only("parallel reads of slot loads"))
    prefetch_max_tokens: int = field(
        default=_NATIVE.offload.prefetch_max_tokens,
        metadata=_py_only("ubatches larger than this (prefill) are not predicted"),
    )
    multidim_weights: tuple[float, float, float] = field(
        default=(_NATIVE.offload.w_recency, _NATIVE.offload.w_frequency, _NATIVE.offload.w_precision),
        metadata=_py_only("(recency, frequency, precision) weights of the multidim policy's score"),
    )
    profile: Any = field(
        default=None,
        metadata=_py_only(
            "per-expert usage [n_layer, n_expert] for the static hot set "
            "(e.g. offload_stats(raw=True)['expert_pairs'] of an earlier run)"
        ),
    )
    replay: Any = field(
        default=None,
        metadata=_py_only(
            "BENCHMARK MODE, never for real use: expert ids [rows, n_layer, n_expert_used] that replace the "
            "router's choices (Trace.fit), or a pair (ids, gate weights) (Trace.fit_routes); outputs are meaningless"
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        for name, low in (("n_ctx", 0), ("n_batch", 1), ("n_ubatch", 1), ("n_threads", 0), ("prefetch_depth", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} ({flag_of(name)}) must be >= {low}, got {getattr(self, name)}")
        if not 0.0 <= self.lo_share <= 1.0:
            raise ValueError(f"lo_share (--lo-share) must be in [0, 1], got {self.lo_share}")
        if self.lo_threshold < 0:
            raise ValueError(f"lo_threshold (--lo-threshold) must be >= 0, got {self.lo_threshold}")
        if not 0.0 <= self.skip_threshold < 1.0:
            raise ValueError(f"skip_threshold (--skip-threshold) must be in [0, 1), got {self.skip_threshold}")

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed; an unknown name is a TypeError that says which."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(unknown)}; hint: pymoe.Settings.describe() lists them")
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Every setting and its help text."""
        return {f.name: f.metadata["help"].replace("%%", "%") for f in dataclasses.fields(cls)}

    # ------------------------------------------------------------------ the native side

    def placement(self) -> tuple[str, list[dict[str, Any]] | None]:
        """The offload tier ('auto' decided) and the devices the layers and the expert slots go to (the
        GPUs and RPC devices, `_core.devices()` entries, connecting to `rpc`); None when they stay in host memory."""
        on_gpu = self.n_gpu_layers != 0 and (bool(self.rpc) or _core.supports_gpu_offload())
        tier = resolve_tier(self.offload_tier, gpu=on_gpu)
        # slots on the device(s) the layers go to: their memory is the budget's
        return tier, (gpu_devices(self.rpc) if on_gpu and tier == "host" else None)

    def resolve(self, path: Path, summary: GGUFSummary) -> tuple[_core.ModelParams, OffloadConfig, Path | None]:
        """The native parameters for loading `path`: 'auto' values decided (budget, tier, sidecar), the
        offload decision and its reason, and the sidecar in use."""
        n_ctx = self.n_ctx or _core.default_n_ctx(_ctx_train(summary))
        tier, devices = self.placement()
        offload = OffloadConfig.resolve(
            summary,
            # the router's choices are read by the engine: recording needs it
            offload="on" if self.record_routing and self.offload == "auto" and summary.is_moe else self.offload,
            expert_budget=self.expert_budget,
            policy=self.policy,
            n_ctx=n_ctx,
            devices=devices,
        )
        if self.record_routing and not offload.enabled:
            raise ValueError(
                f"--record-routing needs the expert engine, which is off here ({offload.reason}); "
                "hint: record a MoE model with --offload on (or auto)"
            )
        sidecar = resolve_sidecar(path, self.sidecar) if offload.enabled else None
        p = _core.ModelParams()
        p.path = str(path)
        for name in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_gpu_layers", "use_mmap", "repack", "flash_attn"):
            setattr(p, name, getattr(self, name))
        p.cache_type = self.cache_type
        p.rpc = list(self.rpc)
        o = p.offload
        o.enabled = offload.enabled
        o.budget = offload.budget
        o.policy = offload.policy
        o.per_layer = self.cache_partition == "layer"
        o.tier = tier
        for name in (
            "cpu_assist",
            "direct_io",
            "io_threads",
            "lo_share",
            "lo_threshold",
            "prefetch",
            "admission",
            "stream",
            "skip_threshold",
            "skip_renormalize",
        ):
            setattr(o, name, getattr(self, name))
        o.prefetch_depth = self.prefetch_depth
        o.prefetch_max_tokens = self.prefetch_max_tokens
        o.w_recency, o.w_frequency, o.w_precision = (float(w) for w in self.multidim_weights)
        o.lo_path = str(sidecar or "")
        o.record_path = str(self.record_routing or "")
        if self.profile is not None:
            import numpy as np

            o.profile = np.asarray(self.profile, dtype=np.float64).ravel().tolist()
        if self.replay is not None:
            o.replay, o.replay_weights = _replay_arrays(self.replay, summary, offload.enabled)
        return p, offload, sidecar


def _ctx_train(summary: GGUFSummary) -> int:
    v = summary.metadata.get(f"{summary.architecture}.context_length", 0)
    return int(v) if isinstance(v, int) else 0


def _replay_arrays(replay: Any, summary: GGUFSummary, enabled: bool) -> tuple[list[int], list[float]]:
    import numpy as np

    if not enabled:
        raise ValueError("replaying a routing trace needs the offload engine: pass offload='on'")
    if isinstance(replay, tuple):
        ids, weights = np.asarray(replay[0], dtype=np.int32), np.asarray(replay[1], np.float32)
    else:
        ids, weights = np.asarray(replay, dtype=np.int32), None
    want = (summary.n_layer, summary.n_expert_used)
    if ids.ndim != 3 or ids.shape[1:] != want:
        raise ValueError(
            f"the replay trace has shape {ids.shape}; this model needs [rows, {want[0]}, {want[1]}]; "
            "hint: Trace.fit(n_layer, n_expert, k) builds one"
        )
    if weights is not None and weights.shape != ids.shape:
        raise ValueError(
            f"the replay trace's weights have shape {weights.shape}, its experts {ids.shape}; "
            "hint: Trace.fit_routes(n_layer, n_expert, k) builds both"
        )
    return ids.ravel().tolist(), (weights.ravel().tolist() if weights is not None else [])


# ---------------------------------------------------------------------- the command line


def flag_of(name: str) -> str:
    """The command-line flag of a setting (its long form), or the setting's name when it has none."""
    flags = next(f for f in dataclasses.fields(Settings) if f.name == name).metadata["flags"]
    return next((f for f in flags if f.startswith("--")), name)


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Adds a flag for every setting that has one (or for the settings named in `only`), grouped as the
    settings are, with their help."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        m = f.metadata
        if not m["flags"] or (only is not None and f.name not in only):
            continue
        if m["group"] not in groups:
            groups[m["group"]] = parser.add_argument_group(m["group"])
        g = groups[m["group"]]
        kw: dict[str, Any] = {"dest": f.name, "help": m["help"]}
        if f.type in ("bool", bool):
            kw["action"] = "store_false" if m["negate"] else "store_true"
            kw["default"] = f.default
        else:
            kw["default"] = f.default
            kw["type"] = m["type"] or (int if f.type in ("int", int) else str)
            if m["choices"]:
                kw["choices"] = m["choices"]
            if m["metavar"]:
                kw["metavar"] = m["metavar"]
        g.add_argument(*m["flags"], **kw)


def from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The settings a command line asked for (flags not given, or not offered by the command, keep their
    defaults)."""
    offered = [f.name for f in dataclasses.fields(Settings) if f.metadata["flags"] and hasattr(args, f.name)]
    values = {name: getattr(args, name) for name in offered}
    values.update(overrides)
    return Settings(**values)
