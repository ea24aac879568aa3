"""`pymoe simulate`: the engine's own cache, policies and planner on a routing trace."""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict

import numpy as np
import pytest
from conftest import run_pymoe

from pymoe import _core
from pymoe.simulate import PLOT_POLICIES, SimResult, hit_rate_curves, simulate
from pymoe.traces import load_trace


def random_routing(n_tokens=400, n_layer=6, n_expert=8, k=2, seed=0):
    rng = np.random.default_rng(seed)
    # a skewed, sticky distribution, as real routers have
    ids = np.zeros((n_tokens, n_layer, k), np.int32)
    pop = rng.dirichlet(np.ones(n_expert) * 0.5, size=n_layer)
    for t in range(n_tokens):
        for il in range(n_layer):
            if t and rng.random() < 0.5:
                ids[t, il] = ids[t - 1, il]
            else:
                ids[t, il] = rng.choice(n_expert, size=k, replace=False, p=pop[il])
    w = rng.random((n_tokens, n_layer, k)).astype(np.float32)
    return ids, w / w.sum(-1, keepdims=True)


def python_lru(ids, cap):
    """An independent per-layer LRU, for comparison."""
    hits = lookups = 0
    caches = [OrderedDict() for _ in range(ids.shape[1])]
    for t in range(ids.shape[0]):
        for il, c in enumerate(caches):
            need = [int(e) for e in ids[t, il]]
            for e in need:
                lookups += 1
                if e in c:
                    hits += 1
                    c.move_to_end(e)
            for e in need:
                if e not in c:
                    while len(c) >= cap:
                        del c[next(x for x in c if x not in need)]
                    c[e] = True
    return hits / lookups


def test_simulator_lru_matches_an_independent_lru():
    ids, w = random_routing()
    for cap in (2, 4):
        sim = _core.CacheSimulator(6, 8, 1024, budget=6 * cap * 1024, policy="lru", per_layer=True, assist=False)
        sim.run(ids, w)
        r = sim.result()
        assert r["n_slots"] == 6 * cap and r["tokens"] == 400
        # equal up to ties: the two experts of one step share a last-use time, which a slot index breaks
        assert abs(r["hits"] / (r["hits"] + r["misses"]) - python_lru(ids, cap)) < 2e-3


def test_simulator_policies_and_mixed_precision():
    ids, w = random_routing(seed=1)
    rates = {}
    for policy in ("lru", "lfu", "multidim"):
        sim = _core.CacheSimulator(6, 8, 1000, budget=12_000, policy=policy, assist=False)
        sim.run(ids, w)
        r = sim.result()
        rates[policy] = r["hits"] / (r["hits"] + r["misses"])
    assert all(0.0 < v < 1.0 for v in rates.values())
    sim = _core.CacheSimulator(6, 8, 1000, expert_bytes_lo=300, budget=12_000, lo_threshold=0.4, assist=False)
    sim.run(ids, w)
    r = sim.result()
    assert r["n_slots_lo"] > 0 and r["lo_pairs"] > 0 and r["loads_lo"] > 0
    assert r["bytes_moved"] == 1000 * r["loads"] + 300 * r["loads_lo"]


def write_trace(path, ids, w):
    """A Mixtral-style trace file: one JSON object per (token, layer)."""
    with open(path, "w") as f:
        for t in range(ids.shape[0]):
            for il in range(ids.shape[1]):
                row = {
                    "problem_id": 0,
                    "layer": il,
                    "token_idx": t,
                    "experts": ids[t, il].tolist(),
                    "gating_probs": w[t, il].tolist(),
                }
                f.write(json.dumps(row) + "\n")
    return path


def test_cli_json(tmp_path):
    ids, w = random_routing(n_tokens=50, n_layer=4)
    trace = write_trace(tmp_path / "trace.jsonl", ids, w)
    proc = run_pymoe("simulate", "--trace", str(trace), "--budget", "0.5", "--policy", "lfu", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    # the command prints what the library function returns, with Belady's bound beside it
    assert simulate(trace, budget=0.5, policy="lfu", bound=True).as_dict() == res
    for key in ("hit_rate", "bytes_per_token", "latency_per_token_s"):
        assert key in res
    assert res["hit_rate"] <= res["bound_hit_rate"] == simulate(trace, budget=0.5, policy="belady").hit_rate
    assert res["preset"] == "mixtral-8x7b" and res["tokens"] == 50 and 0 <= res["hit_rate"] <= 1
    lo = json.loads(
        run_pymoe(
            "simulate",
            "--trace",
            str(trace),
            "--budget",
            "0.5",
            "--lo-type",
            "q2_K",
            "--lo-threshold",
            "0.5",
            "--no-cpu-assist",
            "--json",
        ).stdout
    )
    assert lo["lo_share_of_pairs"] > 0 and lo["n_slots_lo"] > 0
    bad = run_pymoe("simulate", "--trace", str(tmp_path / "none.jsonl"))
    assert bad.returncode != 0 and "does not exist" in bad.stderr


def test_library_function(tmp_path):
    ids, w = random_routing(n_tokens=60, n_layer=4, seed=2)
    trace = write_trace(tmp_path / "trace.jsonl", ids, w)
    res = simulate(trace, budget="50%", policy="lru", cpu_assist=False)
    assert isinstance(res, SimResult) and res.preset == "mixtral-8x7b" and res.layers == 4 and res.tokens == 60
    # a loaded trace, a share as a float and as a percentage: the same simulation
    assert simulate(load_trace(trace), budget=0.5, cpu_assist=False) == res
    assert 0.0 < res.hit_rate < 1.0 and res.loads > 0 and res.direct == 0 and res.share_cached <= 0.5
    # bytes: Mixtral-8x7B's expert at q4_K, as the preset says
    expert = 3 * 4096 * 14336 * 4.5 / 8
    assert simulate(trace, budget=int(8 * expert) + 1, cpu_assist=False).n_slots == 8
    with pytest.raises(ValueError, match="auto"):
        simulate(trace, budget="auto")
    with pytest.raises(ValueError, match="hint: one of"):
        simulate(trace, lo_type="q1_X")
    with pytest.raises(ValueError, match="unknown preset"):
        simulate(trace, preset="gpt-5")
    with pytest.raises(ValueError, match="expert size"):
        simulate(write_trace(tmp_path / "t3.jsonl", *random_routing(n_tokens=5, n_layer=2, n_expert=3)))


def test_skip_threshold_leaves_misses_out_and_saves_their_bytes(tmp_path):
    """--skip-threshold: the step planner's ACTION_SKIP (the engine's adaptive top-k), counted as the engine
    counts it: a miss that moves and computes nothing."""
    ids, w = random_routing(n_tokens=300, n_layer=4, seed=3)
    trace = write_trace(tmp_path / "trace.jsonl", ids, w)
    runs = [simulate(trace, budget=0.25, cpu_assist=False, skip_threshold=t) for t in (0.0, 0.1, 0.2, 0.4)]
    assert runs[0].skipped == 0 and runs[0].skipped_share_of_pairs == 0.0
    assert runs[0] == simulate(trace, budget=0.25, cpu_assist=False)  # 0, the default: never
    expert = 3 * 4096 * 14336 * 4.5 / 8  # the preset's expert: every miss not skipped is loaded
    for a, b in itertools.pairwise(runs):
        assert b.skipped > a.skipped and b.bytes_per_token < a.bytes_per_token
        assert b.latency_per_token_s < a.latency_per_token_s
    rel = w / w.sum(-1, keepdims=True)
    for r, t in zip(runs, (0.0, 0.1, 0.2, 0.4), strict=True):
        assert r.bytes_per_token * r.tokens == pytest.approx(r.loads * int(expert))
        # only pairs weighing less than T can be left out (and only when their expert missed)
        assert r.skipped_share_of_pairs <= (rel < t).mean() + 1e-9
    proc = run_pymoe("simulate", "--trace", str(trace), "--skip-threshold", "0.2", "--no-cpu-assist", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["skipped"] == runs[2].skipped
    bad = run_pymoe("simulate", "--trace", str(trace), "--skip-threshold", "1.5")
    assert bad.returncode != 0 and "skip_threshold (--skip-threshold) must be in [0, 1)" in bad.stderr


def test_plot(tmp_path):
    ids, w = random_routing(n_tokens=40, n_layer=3)
    trace = write_trace(tmp_path / "trace.jsonl", ids, w)
    png = tmp_path / "hits.png"
    proc = run_pymoe("simulate", "--trace", str(trace), "--no-cpu-assist", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in proc.stdout
    # what it draws: a hit rate per policy and budget, never above the bound, rising with the budget
    curves = hit_rate_curves(load_trace(trace), PLOT_POLICIES, [0.25, 0.5, 1.0], cpu_assist=False)
    assert set(curves) == set(PLOT_POLICIES)
    for policy, rates in curves.items():
        assert rates == sorted(rates) and rates[-1] > 0.9
        assert all(r <= b for r, b in zip(rates, curves["belady"], strict=True)), policy


def test_warmup_rows_of_the_shared_logs_are_dropped(tmp_path):
    # vLLM route logs begin with the server's warm-up on dummy data (shared/traces/README.md)
    meta = {"type": "meta", "num_experts": 8}
    for name, warmup in (("qwen1.5-x_layer0.jsonl", 8448), ("olmoe-x_layer0.jsonl", 2048), ("other.jsonl", 0)):
        rows = [meta] + [
            {"type": "route", "req_id": "r", "token_idx": i, "layer": 0, "topk_ids": [i % 8, (i + 1) % 8],
             "topk_weights": [0.5, 0.5]}
            for i in range(warmup + 10)
        ]  # fmt: skip
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r) for r in rows))
        assert load_trace(path).n_tokens == 10 if warmup else load_trace(path).n_tokens == 10 + warmup


def test_budget_accepts_shares_and_sizes_with_a_decimal_point():
    from pymoe.simulate import budget_value

    assert budget_value("0.25") == 0.25
    assert budget_value("6.5GiB") == "6.5GiB"  # once: "could not convert string to float"
    assert budget_value("6GiB") == "6GiB" and budget_value("25%") == "25%"
