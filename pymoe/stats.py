"""The engine's counters, in one place: their names come from the native table
(`PYMOE_LAYER_COUNTERS` in native/pymoe.h), and every figure derived from them
(hit rate, shares, prefetch precision/recall, bytes moved) is computed here and
only here — by the engine's stats, `pymoe bench` and `pymoe simulate` alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import _core

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
