"""Counters in one place: the native table, the Python dicts and every derived figure agree."""

from __future__ import annotations

import pytest

from pymoe import Model, stats


def test_the_table_reaches_python_whole(demo_gguf):
    """Every counter of the native table is in the engine's per-layer dicts and in the summary's totals."""
    assert len(stats.COUNTER_NAMES) == len(set(stats.COUNTER_NAMES)) >= 24
    assert {t for _, t, _ in stats.COUNTERS} <= {"uint64_t", "double"}
    with Model(demo_gguf, n_ctx=256, offload="on", expert_budget=0.3, prefetch=True) as m:
        m.generate("Once upon a time", max_tokens=4, temperature=0)
        raw = m.offload_stats(raw=True)
        summary = m.offload_stats()
    for layer in raw["layers"]:
        assert tuple(layer) == stats.COUNTER_NAMES
    assert set(stats.COUNTER_NAMES) <= set(summary)
    total = stats.totals(raw["layers"])
    assert summary["hits"] == total["hits"] > 0 and summary["prefetch_loads"] == total["prefetch_loads"] > 0
    assert summary["hit_rate"] == stats.hit_rate(total)


def test_derived_figures_on_fixed_counters():
    c = dict.fromkeys(stats.COUNTER_NAMES, 0)
    c.update(hits=6, hits_lo=2, misses=2, pairs=20, pool_pairs=10, lo_pairs=4, prefetch_predicted=8,
             prefetch_correct=6, prefetch_missed=2, bytes_loaded=100, bytes_direct=50, prefetch_bytes=7)  # fmt: skip
    d = stats.derived(c)
    assert d["hit_rate"] == pytest.approx(0.8)
    assert d["pool_share"] == pytest.approx(0.7) and d["lo_share_of_pairs"] == pytest.approx(0.2)
    assert d["prefetch_precision"] == pytest.approx(0.75) and d["prefetch_recall"] == pytest.approx(0.75)
    assert stats.bytes_moved(c) == 157
    empty = dict.fromkeys(stats.COUNTER_NAMES, 0)
    assert stats.hit_rate(empty) is None and stats.derived(empty)["prefetch_precision"] is None
    assert stats.difference(c, empty) == c
