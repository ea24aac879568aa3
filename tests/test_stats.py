"""Counters in one place: the native table, the Python dicts and every derived figure agree."""

from __future__ import annotations

import numpy as np
import pytest

from pymoe import Model, stats
from pymoe.offload import summarize_stats


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


# --- the summary people read (golden text on fixed counters)

GENERATION = {"prompt_tokens": 60, "cached_tokens": 10, "generated_tokens": 50, "prompt_seconds": 0.5,
              "generate_seconds": 4.0}  # fmt: skip


def _layer(**counters):
    out = dict.fromkeys(stats.COUNTER_NAMES, 0)
    out.update(counters)
    return out


def _raw(**changes):
    """The engine's raw dict (Model.offload_stats(raw=True)) of a 3-layer model whose layer 0 is dense:
    disk tier, low-precision slots, prefetching on."""
    raw = {
        "tier": "disk", "budget": 96 << 20, "pool_bytes": 80 << 20, "n_slots": 40, "n_layer": 3, "n_expert": 8,
        "policy": "lru", "read_bandwidth": 1.5e9, "direct_bandwidth": 1.5e9, "cpu_flops": 0.0, "device_flops": 0.0,
        "offload_min_batch": 0, "token_seconds": 0.05, "pools_by_buffer": [("CPU", 96 << 20)],
        "ids_bytes": 1 << 20, "bounce_bytes": 16 << 20, "router_copy_bytes": 0, "pool_bytes_lo": 16 << 20,
        "n_slots_lo": 16, "lo_threshold": 0.2, "prefetch": True, "prefetch_busy_seconds": 0.75,
        "expert_pairs": np.zeros((3, 8), np.uint64),
        "layers": [
            _layer(),
            _layer(steps=100, pairs=200, hits=60, hits_lo=10, misses=30, loads=20, direct=10, evictions=15,
                   pool_pairs=140, direct_pairs=20, lo_pairs=40, bytes_loaded=40 << 20, bytes_direct=20 << 20,
                   load_seconds=0.2, prefetch_predicted=80, prefetch_correct=60, prefetch_missed=20,
                   prefetch_loads=30, prefetch_bytes=60 << 20, prefetch_wait_seconds=0.05, upgrades=3),
            _layer(steps=100, pairs=200, hits=20, misses=80, loads=50, direct=30, evictions=45, pool_pairs=110,
                   direct_pairs=90, bytes_loaded=100 << 20, bytes_direct=60 << 20, load_seconds=0.5,
                   prefetch_predicted=80, prefetch_correct=20, prefetch_missed=60, prefetch_loads=10,
                   prefetch_bytes=20 << 20),
        ],
    }  # fmt: skip
    return raw | changes


def _gpu_raw():
    """Slots on two devices (a GPU and an RPC server), no sidecar, no prefetching; misses on the CPU,
    some of them admitted into the cache in the background."""
    devices = [("CUDA0", 64 << 20), ("RPC0[10.0.0.2:50052]", 16 << 20)]
    raw = _raw(tier="host", prefetch=False, prefetch_busy_seconds=0.0, pool_bytes_lo=0, n_slots_lo=0,
               lo_threshold=0.0, read_bandwidth=24e9, direct_bandwidth=20e9, cpu_flops=4e11, device_flops=2.5e13,
               offload_min_batch=32, pools_by_buffer=devices, router_copy_bytes=3 << 19)  # fmt: skip
    raw["layers"] = [_layer()] + [
        _layer(steps=100, pairs=200, hits=hits, misses=100 - hits, direct=100 - hits, evictions=8, pool_pairs=2 * hits,
               direct_pairs=200 - 2 * hits, bytes_direct=(100 - hits) << 20, admissions=6, bytes_admitted=12 << 20)
        for hits in (75, 25)
    ]  # fmt: skip
    return raw


def test_summary_golden_disk_tier():
    text = stats.summary(summarize_stats(_raw(), tokens=100), GENERATION)
    assert text == (
        "speed        prompt 100.0 tok/s (50 tokens), generation 12.5 tok/s (50 tokens)\n"
        "experts      disk tier, lru policy; 40 slots (80.00 MiB) + 16 low-precision (16.00 MiB) of a 96.00 MiB "
        "budget\n"
        "engine       17.00 MiB beside the budget: expert ids 1.00 MiB, read buffers 16.00 MiB\n"
        "hit rate     45.0% of 200 lookups; 70 loads, 60 evictions\n"
        "moved        3.00 MiB per token over 100 tokens (300.00 MiB); waited 750 ms for loads, 7.5 ms per token\n"
        "computed     72% of pairs from slots, 28% from the model file; 10% in low precision (3 upgraded to high)\n"
        "prefetch     precision 50%, recall 50%; 40 experts loaded ahead (80.00 MiB), 750 ms in the background\n"
        "calibration  disk 1.40 GiB/s, in place 1.40 GiB/s"
    )


def test_summary_golden_slots_on_devices():
    """Per-device slots, the CPU's share, admissions and the calibration in human units; no
    prefetch or low-precision figures, as neither is in use; no speed without a generation."""
    text = stats.summary(summarize_stats(_gpu_raw(), tokens=50), {})
    assert text == (
        "experts      host tier, lru policy; 40 slots in 80.00 MiB of a 96.00 MiB budget\n"
        "             slots on CUDA0 64.00 MiB, RPC0[10.0.0.2:50052] 16.00 MiB\n"
        "engine       18.50 MiB beside the budget: expert ids 1.00 MiB, read buffers 16.00 MiB, router copies "
        "1.50 MiB\n"
        "hit rate     50.0% of 200 lookups; 0 loads, 16 evictions\n"
        "moved        2.00 MiB per token over 50 tokens (100.00 MiB); never waited for a load\n"
        "computed     50% of pairs from slots, 50% on the CPU\n"
        "admission    12 missed experts uploaded in the background (24.00 MiB)\n"
        "calibration  link 22.35 GiB/s, CPU 18.63 GiB/s and 400.0 GFLOP/s, device 25.0 TFLOP/s, batches of 32+ on "
        "the device"
    )


def test_summary_without_offload_or_tokens():
    assert stats.summary(None, GENERATION) == (
        "speed        prompt 100.0 tok/s (50 tokens), generation 12.5 tok/s (50 tokens)\n"
        "experts      offload is off: every expert is computed where it was loaded"
    )
    # before any token: no rates to show, nothing divided by zero
    # before any token: no rates to show, nothing divided by zero; no engine buffers, no line for them
    empty = _raw(prefetch=False, n_slots_lo=0, layers=[_layer(), _layer(), _layer()], ids_bytes=0, bounce_bytes=0)
    assert stats.summary(summarize_stats(empty), {"prompt_tokens": 0}) == (
        "experts      disk tier, lru policy; 40 slots in 80.00 MiB of a 96.00 MiB budget\n"
        "calibration  disk 1.40 GiB/s, in place 1.40 GiB/s"
    )


LINUX = {"os": "linux", "uncached_reads": True, "drop_file_cache": True, "mapping_will_need": True,
         "mapping_release": True, "memory_limit": True, "available_memory": "MemAvailable"}  # fmt: skip


def test_summary_says_what_the_platform_cannot_do_for_the_disk_tier():
    """Model.offload_stats()["platform"]: a line only where the OS lacks something the disk tier uses."""
    disk = summarize_stats(_raw(prefetch=False), tokens=100)
    assert "platform" not in stats.summary(disk | {"platform": LINUX})
    macos = LINUX | {"os": "macos", "drop_file_cache": False, "mapping_release": False}
    lines = stats.summary(disk | {"platform": macos}).splitlines()
    assert lines[-2:] == [
        "platform     macos: pages read stay in the OS file cache; experts computed in place stay resident after use",
        "calibration  disk 1.40 GiB/s, in place 1.40 GiB/s",
    ]
    tmpfs = LINUX | {"uncached_reads": False}
    assert "platform     linux: slot loads go through the OS file cache\n" in stats.summary(disk | {"platform": tmpfs})
    # the host tier reads no file: what the OS cannot do with one does not matter to it
    host = summarize_stats(_gpu_raw(), tokens=50)
    assert "platform" not in stats.summary(host | {"platform": macos})


def test_layers_golden():
    assert stats.layers(_raw(), tokens=100) == (
        "layer  hit rate                    lookups   loads in place  moved/token recall\n"
        "    1   70% ##############......       100      20      10%     1.20 MiB    75%\n"
        "    2   20% ####................       100      50      45%     1.80 MiB    25%"
    )
    assert stats.layers(_gpu_raw()) == (
        "layer  hit rate                    lookups   loads in place        moved\n"
        "    1   75% ###############.....       100       0      25%    25.00 MiB\n"
        "    2   25% #####...............       100       0      75%    75.00 MiB"
    )


def test_summary_of_a_real_run_fits_a_screen(demo_gguf):
    """After one answer: a dozen lines at most, none wider than a terminal's 120 columns, each figure
    the summary dict's."""
    with Model(demo_gguf, n_ctx=256, offload="on", expert_budget=0.3, prefetch=True) as m:
        m.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=8, temperature=0)
        s = m.stats()
        raw = m.offload_stats(raw=True)
    text = stats.summary(s["offload"], s)
    lines = text.splitlines()
    assert len(lines) <= 12 and max(map(len, lines)) <= 120, text
    assert [line.split()[0] for line in lines if not line.startswith(" ")] == [
        "speed", "experts", "engine", "hit", "moved", "computed", "prefetch", "calibration",
    ]  # fmt: skip
    assert f"{s['offload']['hit_rate']:.1%} of {stats.lookups(s['offload']):,} lookups" in text
    assert f"({s['prompt_tokens']} tokens)" in text and f"({s['generated_tokens']} tokens)" in text
    per_layer = stats.layers(raw, stats.tokens_counted(s["offload"])).splitlines()
    assert len(per_layer) == 1 + 30  # a header and the 30 MoE layers
    tokens = stats.tokens_counted(s["offload"])  # the prompt, and the generated tokens fed back
    assert tokens == pytest.approx(round(tokens)) and 0 <= s["prompt_tokens"] + s["generated_tokens"] - tokens <= 1
