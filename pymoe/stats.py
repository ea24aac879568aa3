"""The engine's counters, in one place: their names come from the native table
(`PYMOE_LAYER_COUNTERS` in native/pymoe.h), and every figure derived from them
(hit rate, shares, prefetch precision/recall, bytes moved) is computed here and
only here — by the engine's stats, `pymoe bench` and `pymoe simulate` alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import _core
from ._units import format_bytes

# (name, C type, meaning) of every per-layer counter, in the table's order
COUNTERS: tuple[tuple[str, str, str], ...] = tuple((str(n), str(t), str(d)) for n, t, d in _core.layer_counters())
COUNTER_NAMES: tuple[str, ...] = tuple(name for name, _, _ in COUNTERS)

# the bytes a token's experts cost to bring where they are computed
MOVED_KEYS = ("bytes_loaded", "bytes_loaded_lo", "bytes_direct", "prefetch_bytes")


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def totals(layers: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Every counter summed over the layers."""
    out: dict[str, Any] = dict.fromkeys(COUNTER_NAMES, 0)
    for layer in layers:
        for k in COUNTER_NAMES:
            out[k] += layer[k]
    return out


def difference(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    """The counters of one layer (or of totals) between two snapshots."""
    return {k: after[k] - before[k] for k in COUNTER_NAMES}


def lookups(c: Mapping[str, Any]) -> int:
    """Distinct experts looked up in the cache (per step): hits, low hits and misses."""
    return c["hits"] + c.get("hits_lo", 0) + c["misses"]


def hit_rate(c: Mapping[str, Any]) -> float | None:
    """Share of the lookups that found the expert in a slot (high or low precision); None without lookups."""
    return ratio(c["hits"] + c.get("hits_lo", 0), lookups(c))


def bytes_moved(c: Mapping[str, Any]) -> int:
    return sum(c.get(k, 0) for k in MOVED_KEYS)


def derived(c: Mapping[str, Any]) -> dict[str, float | None]:
    """The figures people read, from counters (one layer's or totals)."""
    return {
        "hit_rate": hit_rate(c) or 0.0,
        "pool_share": ratio(c["pool_pairs"] + c["lo_pairs"], c["pairs"]) or 0.0,
        "lo_share_of_pairs": ratio(c["lo_pairs"], c["pairs"]) or 0.0,
        "prefetch_precision": ratio(c["prefetch_correct"], c["prefetch_predicted"]),
        "prefetch_recall": ratio(c["prefetch_correct"], c["prefetch_correct"] + c["prefetch_missed"]),
    }


# --- the summary people read: chat's /stats, --stats, `pymoe bench`, the server's shutdown log
#
# `summary` reads `Model.offload_stats()` (the totals and settings above) and a
# generation dict (`Model.stats()` or `GenerationStats.as_dict()`); `layers`
# reads the engine's raw per-layer counters. Each shows only what is in use.

_LABEL = 12  # width of the label column
_BAR = 20  # width of a layer's hit-rate bar


def _share(x: float) -> str:
    return f"{x:.0%}" if x == 0 or x >= 0.01 else "<1%"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 10 else f"{s:.1f} s"


def _rate(bytes_per_second: float) -> str:
    return f"{format_bytes(bytes_per_second)}/s"


def _flops(f: float) -> str:
    return f"{f / 1e12:.1f} TFLOP/s" if f >= 1e12 else f"{f / 1e9:.1f} GFLOP/s"


def on_devices(offload: Mapping[str, Any]) -> bool:
    """Whether slots live on GPUs or RPC devices (buffer types other than the host's)."""
    return any(name != "CPU" for name, _ in offload["pools_by_buffer"])


def tokens_counted(offload: Mapping[str, Any]) -> float | None:
    """The tokens the counters cover, from the summary's bytes moved per token (None where unknown)."""
    per_token = offload.get("bytes_moved_per_token")
    return bytes_moved(offload) / per_token if per_token else None


def _speed(g: Mapping[str, Any]) -> str | None:
    parts = []
    evaluated = g.get("prompt_tokens", 0) - g.get("cached_tokens", 0)
    if evaluated > 0 and g.get("prompt_seconds", 0) > 0:
        parts.append(f"prompt {evaluated / g['prompt_seconds']:.1f} tok/s ({evaluated:,} tokens)")
    generated = g.get("generated_tokens", 0)
    if generated > 0 and g.get("generate_seconds", 0) > 0:
        parts.append(f"generation {generated / g['generate_seconds']:.1f} tok/s ({generated:,} tokens)")
    return ", ".join(parts) or None


# the engine's buffers beside the budget (native/pymoe.h, offload_stats), named as `pymoe info` names them
_OVERHEAD = (("ids_bytes", "expert ids"), ("bounce_bytes", "read buffers"), ("router_copy_bytes", "router copies"))

# what the disk tier does where the platform lets it (platform_capabilities), and what happens where not
_PLATFORM = (
    ("uncached_reads", "slot loads go through the OS file cache"),
    ("drop_file_cache", "pages read stay in the OS file cache"),
    ("mapping_release", "experts computed in place stay resident after use"),
    ("mapping_will_need", "no read-ahead for experts computed in place"),
)


def _budget(o: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    if o["n_slots_lo"]:
        lo = f"{o['n_slots_lo']:,} low-precision ({format_bytes(o['pool_bytes_lo'])})"
        slots = f"{o['n_slots']:,} slots ({format_bytes(o['pool_bytes'])}) + {lo} of"
    else:
        slots = f"{o['n_slots']:,} slots in {format_bytes(o['pool_bytes'])} of"
    devices = None
    if on_devices(o):
        devices = "slots on " + ", ".join(f"{name} {format_bytes(n)}" for name, n in o["pools_by_buffer"])
    beside = [f"{name} {format_bytes(o[k])}" for k, name in _OVERHEAD if o.get(k)]
    engine = f"{format_bytes(o['overhead_bytes'])} beside the budget: " + ", ".join(beside) if beside else None
    return [
        ("experts", f"{o['tier']} tier, {o['policy']} policy; {slots} a {format_bytes(o['budget'])} budget"),
        ("", devices),
        ("engine", engine),
    ]


def _hits(o: Mapping[str, Any]) -> str | None:
    n = lookups(o)
    if not n:
        return None
    return f"{hit_rate(o):.1%} of {n:,} lookups; {o['loads']:,} loads, {o['evictions']:,} evictions"


def _moved(o: Mapping[str, Any]) -> str | None:
    moved, waited = bytes_moved(o), o["load_seconds"] + o["prefetch_wait_seconds"]
    if not moved and not waited:
        return None
    tokens = tokens_counted(o)
    wait = f"waited {_seconds(waited)} for loads" if waited else "never waited for a load"
    if not tokens:
        return f"{format_bytes(moved)}; {wait}"
    if waited:
        wait += f", {waited / tokens * 1e3:.1f} ms per token"
    per_token = f"{format_bytes(o['bytes_moved_per_token'])} per token over {round(tokens):,} tokens"
    return f"{per_token} ({format_bytes(moved)}); {wait}"


def _computed(o: Mapping[str, Any]) -> str | None:
    if not o["pairs"]:
        return None
    place = "on the CPU" if on_devices(o) else "from the model file" if o["tier"] == "disk" else "from host memory"
    text = f"{_share(o['pool_share'])} of pairs from slots, {_share(o['direct_pairs'] / o['pairs'])} {place}"
    if o["n_slots_lo"] or o["lo_pairs"]:
        text += f"; {_share(o['lo_share_of_pairs'])} in low precision"
        if o["upgrades"]:
            text += f" ({o['upgrades']:,} upgraded to high)"
    if o.get("skipped_pairs"):
        text += f"; {_share(o['skipped_pairs'] / o['pairs'])} skipped (--skip-threshold)"
    return text


def _prefetch(o: Mapping[str, Any]) -> str | None:
    if not o["prefetch"]:
        return None
    precision, recall = o["prefetch_precision"], o["prefetch_recall"]
    if precision is None:
        return "on; nothing predicted yet"
    return (
        f"precision {_share(precision)}, recall {_share(recall or 0.0)}; {o['prefetch_loads']:,} experts loaded "
        f"ahead ({format_bytes(o['prefetch_bytes'])}), {_seconds(o['prefetch_busy_seconds'])} in the background"
    )


def _admission(o: Mapping[str, Any]) -> str | None:
    if not o["admissions"]:
        return None
    return f"{o['admissions']:,} missed experts uploaded in the background ({format_bytes(o['bytes_admitted'])})"


def _calibration(o: Mapping[str, Any]) -> str | None:
    devices = on_devices(o)
    loads = "link" if devices else "disk" if o["tier"] == "disk" else "host copy"
    direct = [_rate(o["direct_bandwidth"])] if o["direct_bandwidth"] else []
    direct += [_flops(o["cpu_flops"])] if o["cpu_flops"] else []
    parts = [
        f"{loads} {_rate(o['read_bandwidth'])}" if o["read_bandwidth"] else "",
        f"{'CPU' if devices else 'in place'} {' and '.join(direct)}" if direct else "",
        f"device {_flops(o['device_flops'])}" if o["device_flops"] else "",
        f"batches of {o['offload_min_batch']}+ on the device" if o["offload_min_batch"] else "",
    ]
    return ", ".join(p for p in parts if p) or None


def _platform(o: Mapping[str, Any]) -> str | None:
    """What this OS cannot do for the disk tier (nothing where it can do all of it)."""
    caps = o.get("platform")
    if o["tier"] != "disk" or not caps:
        return None
    missing = [what for k, what in _PLATFORM if not caps.get(k, True)]
    return f"{caps['os']}: " + "; ".join(missing) if missing else None


def summary(offload: Mapping[str, Any] | None, generation: Mapping[str, Any] | None = None) -> str:
    """A dozen lines at most: speed (from `generation`), then the expert engine (from `offload`,
    `Model.offload_stats()`; None: offload is off) — where the budget went, hit rate, bytes moved
    and the time the decode waited for them, where pairs were computed, and the low-precision,
    prefetch and admission figures when those are in use, what the OS cannot do for the disk tier
    (`offload["platform"]`, where given), then the engine's calibration."""
    rows: list[tuple[str, str | None]] = [("speed", _speed(generation) if generation else None)]
    if offload is None:
        rows.append(("experts", "offload is off: every expert is computed where it was loaded"))
    else:
        rows += _budget(offload)
        rows += [
            ("hit rate", _hits(offload)),
            ("moved", _moved(offload)),
            ("computed", _computed(offload)),
            ("prefetch", _prefetch(offload)),
            ("admission", _admission(offload)),
            ("platform", _platform(offload)),
            ("calibration", _calibration(offload)),
        ]
    return "\n".join(f"{label:<{_LABEL}} {text}" for label, text in rows if text)


def layers(raw: Mapping[str, Any], tokens: float | None = None) -> str:
    """One line per MoE layer from the engine's raw counters (`Model.offload_stats(raw=True)`):
    hit rate as a bar, lookups, loads, the share of pairs computed in place, bytes moved
    (per token when `tokens` is given) and, with prefetching on, its recall."""
    prefetch = bool(raw["prefetch"])
    moved_head = "moved/token" if tokens else "moved"
    head = f"{'layer':>5}  {'hit rate':<{_BAR + 6}} {'lookups':>8} {'loads':>7} {'in place':>8} {moved_head:>12}"
    rows = [head + (f" {'recall':>6}" if prefetch else "")]
    for i, c in enumerate(raw["layers"]):
        if not c["steps"]:
            continue  # a dense layer
        rate = hit_rate(c)
        filled = round((rate or 0.0) * _BAR)
        hit = f"{rate:>4.0%} " + "#" * filled + "." * (_BAR - filled) if rate is not None else "   -"
        moved = bytes_moved(c) / tokens if tokens else bytes_moved(c)
        in_place = _share(c["direct_pairs"] / c["pairs"]) if c["pairs"] else "-"
        row = f"{i:>5}  {hit:<{_BAR + 6}} {lookups(c):>8,} {c['loads']:>7,} {in_place:>8} {format_bytes(moved):>12}"
        if prefetch:
            recall = derived(c)["prefetch_recall"]
            row += f" {_share(recall) if recall is not None else '-':>6}"
        rows.append(row)
    return "\n".join(rows)
