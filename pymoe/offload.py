"""Expert-offload settings: budgets, the automatic budget, and stats summaries.

The engine itself is native (native/pymoe-engine.*); this module turns user
input ("6GiB", 0.5, "auto") into bytes and the engine's counters into
readable summaries.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _core, stats
from .gguf_info import GGUFSummary

OFFLOAD_MODES = ("auto", "on", "off")
# the policies a model can run (an offline one, belady, reads the future: pymoe simulate only)
POLICIES = tuple(p for p in _core.policy_names() if not _core.policy_needs_future(p))
# the expert cache's slot pools: one per layer, or one per tensor format shared
# by the layers (see docs/design.md, "Slot pools per layer")
PARTITIONS = ("layer", "shared")


def check_partition(partition: str) -> bool:
    """True for per-layer pools; a clear error for an unknown name."""
    if partition not in PARTITIONS:
        raise ValueError(f"unknown cache partition '{partition}'; hint: one of {', '.join(PARTITIONS)}")
    return partition == "layer"


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """'6GiB', '512 MiB', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; hint: write e.g. 6GiB, 512MiB, 2.5G or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_budget(value: str | float | int | None, expert_bytes: int) -> int | None:
    """The expert budget in bytes; None for "auto".

    A float in (0, 1] or "NN%" is a share of the model's expert bytes; an int
    or a string with a unit is bytes."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool):
        raise ValueError("expert_budget must be a size, a fraction or 'auto'")
    if isinstance(value, float) or (isinstance(value, str) and value.strip().endswith("%")):
        share = float(str(value).strip().rstrip("%")) / (100.0 if str(value).strip().endswith("%") else 1.0)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"an expert budget share must be between 0 and 1 (or 0% and 100%), got {value!r}")
        return int(share * expert_bytes)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("the expert budget cannot be negative")
        return value
    return parse_size(value)


def available_memory() -> int:
    """Bytes this process may still use, as the OS tells it (native/pymoe-platform.cpp):
    Linux MemAvailable capped by a cgroup memory limit (v1 or v2), macOS free +
    inactive pages, Windows available physical memory."""
    return _core.available_memory()


def kv_cache_bytes(summary: GGUFSummary, n_ctx: int, bytes_per_value: float = 2.0) -> int:
    """An estimate of the KV cache of `n_ctx` tokens from the model's metadata."""
    meta, arch = summary.metadata, summary.architecture

    def get(key: str, default: int = 0) -> int:
        v = meta.get(f"{arch}.{key}", default)
        return int(v) if isinstance(v, (int, float)) else default

    n_embd = get("embedding_length")
    n_head = max(1, get("attention.head_count", 1))
    n_head_kv = get("attention.head_count_kv", n_head) or n_head
    k_len = get("attention.key_length", n_embd // n_head)
    v_len = get("attention.value_length", n_embd // n_head)
    return int(summary.n_layer * n_ctx * n_head_kv * (k_len + v_len) * bytes_per_value)


def auto_budget(summary: GGUFSummary, n_ctx: int, devices: list[dict[str, Any]] | None = None) -> int:
    """What is left of the fast memory for expert slots after the rest of the
    model, the KV cache and a reserve for compute buffers and the engine's read
    buffers (1/8 of the rest, at least 128 MiB: under a 576 MiB cgroup limit a
    1.2 GiB model with a 330 MiB budget peaked at 494 MiB, page cache included;
    docs/benchmarks.md). The fast memory is the free memory of `devices` (the
    GPUs or RPC devices the layers go to: `_core.devices()` entries) when there
    are any, else what this process may still use of the host's."""
    other = summary.other_bytes + kv_cache_bytes(summary, n_ctx)
    fast = sum(int(d["free"]) for d in devices) if devices else available_memory()
    free = fast - other
    reserve = max(128 << 20, free // 8)
    return max(0, free - reserve)


def gpu_devices(rpc: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The devices layers go to: this machine's GPUs and the devices of the RPC servers `rpc` (connected here)."""
    if rpc:
        _core.connect_rpc(list(rpc))
    return [d for d in _core.devices() if d["type"] in ("gpu", "igpu") and (not d["endpoint"] or d["endpoint"] in rpc)]


@dataclass
class OffloadConfig:
    """How a model is loaded: `enabled` and the byte `budget` the engine gets."""

    enabled: bool
    budget: int
    policy: str
    reason: str  # why offload is on or off, for messages

    @classmethod
    def resolve(
        cls,
        summary: GGUFSummary,
        *,
        offload: str = "auto",
        expert_budget: str | float | int | None = "auto",
        policy: str = "lru",
        n_ctx: int = 4096,
        devices: list[dict[str, Any]] | None = None,
    ) -> OffloadConfig:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; hint: use one of {', '.join(POLICIES)}")
        if offload == "off":
            return cls(False, 0, policy, "offload is off")
        if not summary.is_moe:
            if offload == "on":
                raise ValueError(f"'{summary.path}' is a dense model: there are no experts to offload")
            return cls(False, 0, policy, "a dense model: no experts to offload")
        budget = parse_budget(expert_budget, summary.expert_bytes)
        explicit = budget is not None
        if budget is None:
            budget = auto_budget(summary, n_ctx, devices)
        if offload == "auto" and budget >= summary.expert_bytes:
            return cls(False, budget, policy, "every expert fits the budget: the model runs fully resident")
        how = "given" if explicit else "from the free device memory" if devices else "from the free memory"
        return cls(True, min(budget, summary.expert_bytes), policy, f"expert budget {budget} bytes ({how})")


TIERS = ("auto", "disk", "host")

# relative gate weight (the pair's weight over its token's top-k sum) below which
# a pair may use the low-precision copy: the native default (offload_params in
# pymoe.h); docs/quality.md has the measurement behind the value
DEFAULT_LO_THRESHOLD = round(_core.ModelParams().offload.lo_threshold, 6)


def resolve_sidecar(main: Path, sidecar: str | os.PathLike[str] | None) -> Path | None:
    """The low-precision sidecar to use: None (none), "auto" (MODEL.lo.gguf
    beside the model when it exists) or a path, checked to belong to `main`."""
    from .sidecar import check_sidecar, default_sidecar_path

    if sidecar is None:
        return None
    if str(sidecar) == "auto":
        candidate = default_sidecar_path(main)
        if not candidate.is_file():
            return None
        sidecar = candidate
    check_sidecar(main, sidecar)
    return Path(sidecar)


def resolve_tier(tier: str, *, gpu: bool = False) -> str:
    """'auto': the host tier when the model runs on a GPU (this machine's, or an RPC device: `gpu`),
    else the disk tier."""
    if tier not in TIERS:
        raise ValueError(f"offload tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if tier == "auto":
        return "host" if gpu or _core.supports_gpu_offload() else "disk"
    return tier


def summarize_stats(raw: dict[str, Any], tokens: int | None = None) -> dict[str, Any]:
    """Totals, rates and per-layer lists from the engine's counters (pymoe.stats derives every figure)."""
    layers = raw["layers"]
    total = stats.totals(layers)
    # the engine's settings, calibration and memory as it reports them; the per-layer and per-expert
    # arrays become totals and lists below
    out: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("layers", "expert_pairs", "n_layer", "n_expert")}
    out.update(
        {
            "pools_by_buffer": [list(p) for p in raw["pools_by_buffer"]],
            "overhead_bytes": raw["ids_bytes"] + raw["bounce_bytes"] + raw["router_copy_bytes"],
        }
    )
    out |= {
        **stats.derived(total),
        **total,
        "per_layer": {
            "hit_rate": [stats.hit_rate(lay) for lay in layers],
            "loads": [lay["loads"] for lay in layers],
            "direct": [lay["direct"] for lay in layers],
            "prefetch_precision": [stats.derived(lay)["prefetch_precision"] for lay in layers],
            "prefetch_recall": [stats.derived(lay)["prefetch_recall"] for lay in layers],
        },
    }
    if tokens:
        out["bytes_moved_per_token"] = stats.bytes_moved(total) / tokens
    return out
