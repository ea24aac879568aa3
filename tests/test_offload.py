"""The expert-offload engine: exactness against the unhooked path, the byte
budget, the planner and the eviction policies as pure functions, stats, CLI.

Exactness is bit for bit on the CPU backend: a pair computed from a slot runs
the same kernel on the same bytes as from the model's tensor, a skipped pair
is an exact zero, and x + 0 == x."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool, run_pymoe

from pymoe import Model, _core, summarize
from pymoe.offload import OffloadConfig, parse_budget, parse_size

N_BATCH_TOKENS = 40
N_STEP_TOKENS = 12


def batch_and_steps(m: Model, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced logits of a batch, then of one token at a time (decode)."""
    batch = m.logits(tokens)
    m.reset()
    steps = np.stack([m.next_token_logits(tokens[: i + 1]) for i in range(N_STEP_TOKENS)])
    return batch, steps


def one_slot_bytes(path) -> int:
    return _core.offload_plan(str(path), 1 << 40)["pools"][0]["slot_bytes"]


@pytest.fixture(scope="module")
def baselines(tiny):
    """Logits of the tiny models with offload off, and a usage profile recorded under LRU."""
    out = {}
    for arch in ("mixtral", "qwen2_moe"):
        path = tiny.gguf(arch)
        with Model(path, cache_type="f32", offload="off") as m:
            tokens = np.random.default_rng(7).integers(0, m.n_vocab, N_BATCH_TOKENS).tolist()
            batch, steps = batch_and_steps(m, tokens)
        with Model(path, cache_type="f32", offload="on", expert_budget=0.5) as m:
            m.logits(tokens)
            profile = m.offload_stats(raw=True)["expert_pairs"]
        out[arch] = (path, tokens, batch, steps, profile)
    return out


BUDGETS = ["one-slot", 0.25, 0.5, 1.0]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])  # qwen2_moe: a shared expert beside the routed ones
@pytest.mark.parametrize("tier", ["disk", "host"])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("policy", ["lru", "lfu", "static", "markov"])
def test_logits_equal_the_unhooked_path(baselines, arch, tier, budget, policy):
    path, tokens, ref_batch, ref_steps, profile = baselines[arch]
    budget_bytes = one_slot_bytes(path) if budget == "one-slot" else budget
    with Model(
        path,
        cache_type="f32",
        offload="on",
        expert_budget=budget_bytes,
        policy=policy,
        profile=profile if policy == "static" else None,
        offload_tier=tier,
        cpu_assist=False,
    ) as m:  # no CPU assist: misses take slots, so slots are exercised
        batch, steps = batch_and_steps(m, tokens)
        stats = m.offload_stats()
    np.testing.assert_array_equal(batch, ref_batch)
    np.testing.assert_array_equal(steps, ref_steps)
    assert stats["pairs"] == stats["pool_pairs"] + stats["direct_pairs"]
    if budget == 1.0:
        assert stats["direct"] == 0 and stats["evictions"] == 0
    if policy != "static":
        assert stats["loads"] > 0  # the pool branch did the work
    else:
        assert stats["loads"] == 0  # the hot set is fixed; misses are computed in place


def test_budget_zero_and_cpu_assist_are_exact(baselines):
    path, tokens, ref_batch, ref_steps, _ = baselines["mixtral"]
    for kw in ({"expert_budget": 0}, {"expert_budget": 0.5, "offload_tier": "host", "cpu_assist": True}):
        with Model(path, cache_type="f32", offload="on", **kw) as m:
            batch, steps = batch_and_steps(m, tokens)
            assert m.offload_stats()["pool_pairs"] == 0  # everything in place: budget 0, or copying never pays
        np.testing.assert_array_equal(batch, ref_batch)
        np.testing.assert_array_equal(steps, ref_steps)


@pytest.mark.parametrize("tier", ["disk", "host"])
def test_one_token_ubatches(demo_gguf, tier):
    """n_ubatch=1 (`-b 1`): the router's choice must still be readable when the
    engine reads it (the allocator once reused its memory: a crash)."""
    tokens = [1, 504, 3458, 282, 4649, 314]
    with Model(demo_gguf, n_ctx=64, n_batch=1, n_ubatch=1, offload="off") as m:
        ref = m.logits(tokens)
    with Model(demo_gguf, n_ctx=64, n_batch=1, n_ubatch=1, offload="on", expert_budget=0.5, offload_tier=tier) as m:
        np.testing.assert_array_equal(m.logits(tokens), ref)
        assert m.offload_stats()["pairs"] == 30 * 2 * len(tokens)  # every layer planned every token


@pytest.fixture(scope="module")
def repacked_models(tmp_path_factory):
    """The tiny synthetic model with experts in the types llama.cpp repacks
    for its CPU kernels (q4_0, q4_K, iq4_nl on x86 and ARM)."""
    synth = load_tool("make_synthetic_moe")
    root = tmp_path_factory.mktemp("repacked")
    return {t: synth.write_model("tiny", root / f"tiny-{t}.gguf", seed=3, expert_type=t) for t in ("q4_0", "q4_K")}


@pytest.mark.parametrize("etype", ["q4_0", "q4_K"])
@pytest.mark.parametrize("tier", ["disk", "host"])
def test_repackable_expert_types_are_exact(repacked_models, etype, tier):
    """Offloading keeps llama.cpp from repacking (slots are byte copies of the
    file's layout): the logits equal offload off with repack=False bit for bit."""
    path = repacked_models[etype]
    tokens = [1, *range(300, 340)]
    with Model(path, n_ctx=128, offload="off", repack=False) as m:
        ref = m.logits(tokens)
    with Model(path, n_ctx=128, offload="off") as m:  # repacked kernels: the same maths, summed in another order
        np.testing.assert_allclose(m.logits(tokens), ref, atol=0.1)
    for budget in (0, 0.25, 1.0):
        with Model(path, n_ctx=128, offload="on", expert_budget=budget, offload_tier=tier, cpu_assist=False) as m:
            np.testing.assert_array_equal(m.logits(tokens), ref)
            assert (m.offload_stats()["loads"] > 0) == (budget > 0)


def test_demo_model_greedy_text_is_unchanged(demo_gguf):
    prompt = "The capital of France is"
    with Model(demo_gguf, n_ctx=256, offload="off") as m:
        expected = m.generate(prompt, max_tokens=24, temperature=0)
        ref = m.logits(m.tokenize(prompt))
    for budget, partition in ((0.1, "layer"), (0.1, "shared"), (0.5, "layer")):
        with Model(demo_gguf, n_ctx=256, offload="on", expert_budget=budget, cache_partition=partition) as m:
            assert m.generate(prompt, max_tokens=24, temperature=0) == expected
            np.testing.assert_array_equal(m.logits(m.tokenize(prompt)), ref)
            s = m.offload_stats()
            assert s["loads"] > 0 and s["hit_rate"] < 1.0
            # 10%: 24 slots for a working set of 60 per token. Shared by the layers, visited in
            # layer order, LRU evicts what the next token wants first and never hits; a pool per
            # layer keeps each layer's share, and a layer's repeated experts hit
            assert (s["hit_rate"] > 0.0) == (partition == "layer")


def test_pools_stay_within_the_budget(demo_gguf):
    summary = summarize(demo_gguf)
    slots = []
    for share in (0.0, 0.01, 0.1, 0.33, 0.9, 1.0):
        budget = int(share * summary.expert_bytes)
        plan = _core.offload_plan(str(demo_gguf), budget)
        with Model(demo_gguf, n_ctx=128, offload="on", expert_budget=budget) as m:
            raw = m.offload_stats(raw=True)
        assert raw["pool_bytes"] <= budget  # the backend buffer, as ggml allocated it
        assert raw["pool_bytes"] == plan["bytes"] and raw["n_slots"] == sum(p["n_slots"] for p in plan["pools"])
        slots.append(raw["n_slots"])
    assert slots == sorted(slots) and slots[0] == 0 and slots[-1] == summary.n_layer * summary.n_expert


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of `path` (from /proc/self/smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                current = line.rstrip().endswith(str(path))
            elif current and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def test_disk_tier_keeps_experts_out_of_memory(demo_gguf):
    """Experts reach memory only through the budgeted slots: the model file's
    mapping stays at about the non-expert weights, whatever the direct branch read."""
    summary = summarize(demo_gguf)
    one_layer = summary.bytes_per_expert * summary.n_expert
    for budget in (0, 0.1):
        with Model(demo_gguf, n_ctx=256, offload="on", expert_budget=budget, offload_tier="disk") as m:
            m.generate("Once upon a time", max_tokens=16, temperature=0)
            s = m.offload_stats()
            # budget 0: every expert computed from the file mapping; 0.1: misses read into slots
            # (24 slots for 30 layers: the layers without one still compute in place)
            assert (s["direct"] > 0, s["loads"] > 0) == ((True, False) if budget == 0 else (True, True))
            assert _mapped_rss(demo_gguf) <= summary.other_bytes + one_layer
    with Model(demo_gguf, n_ctx=256, offload="off") as m:  # contrast: plain llama.cpp maps it all in
        m.generate("Once upon a time", max_tokens=4, temperature=0)
        assert _mapped_rss(demo_gguf) > summary.other_bytes + 4 * one_layer


# --- the planner and the policies, alone

HIT, LOAD, DIRECT = 0, 1, 2


def test_planner_hits_loads_by_tokens_then_direct():
    experts = [
        (0, 1, 0.5, True, False),
        (1, 5, 0.9, False, False),
        (2, 9, 0.3, False, False),
        (3, 2, 0.8, False, False),
    ]
    assert _core.plan_layer(experts, capacity=2) == [HIT, LOAD, LOAD, DIRECT]
    assert _core.plan_layer(experts, capacity=0) == [HIT, DIRECT, DIRECT, DIRECT]
    assert _core.plan_layer(experts, capacity=9, admit=False) == [HIT, DIRECT, DIRECT, DIRECT]
    # equal token counts: the larger gate weight first
    assert _core.plan_layer([(5, 3, 0.1, False, False), (6, 3, 0.7, False, False)], capacity=1) == [DIRECT, LOAD]


def test_planner_cost_model():
    miss = [(0, 1, 1.0, False, False)]
    expert_bytes, flops = 100_000_000, 2 * 50_000_000
    # weights in host RAM, compute on a slow CPU vs loading over a fast link to a fast device
    kw = dict(capacity=4, expert_bytes=expert_bytes, flops_per_token=flops, direct_bw=0.0)
    assert _core.plan_layer(miss, read_bw=25e9, fast_flops=1e14, slow_flops=1e9, **kw) == [LOAD]
    # a decode token on a fast CPU against a slow link: compute it where it is (Fiddler)
    assert _core.plan_layer(miss, read_bw=1e9, fast_flops=1e14, slow_flops=5e11, **kw) == [DIRECT]
    # ... unless it will be reused enough, or CPU assist is off
    assert _core.plan_layer(miss, read_bw=1e9, fast_flops=1e14, slow_flops=5e11, reuse=1000, **kw) == [LOAD]
    assert _core.plan_layer(miss, read_bw=1e9, fast_flops=1e14, slow_flops=5e11, assist=False, **kw) == [LOAD]
    # a prefill expert with many tokens: loading wins
    many = [(0, 512, 1.0, False, False)]
    assert _core.plan_layer(many, read_bw=1e9, fast_flops=1e14, slow_flops=5e11, **kw) == [LOAD]
    # the disk tier: both paths read the same disk, so a free slot is always used
    assert _core.plan_layer(miss, capacity=1, expert_bytes=expert_bytes, read_bw=1e9, direct_bw=1e9) == [LOAD]


def test_policies_pick_their_victims():
    # (layer, expert, last_use, uses, profile, hi_uses)
    slots = [(0, 0, 5, 10, 0.1, 0), (0, 1, 2, 50, 0.9, 0), (1, 0, 9, 1, 0.5, 0), (1, 3, 7, 1, 0.05, 0)]
    assert _core.policy_pick_victim("lru", slots) == 1
    assert _core.policy_pick_victim("lfu", slots) == 3  # fewest uses, ties by recency: last_use 7 < 9
    assert _core.policy_pick_victim("static", slots) == 3  # coldest in the profile
    assert _core.policy_admits_on_miss("lru") and _core.policy_admits_on_miss("lfu")
    assert not _core.policy_admits_on_miss("static")
    with pytest.raises(ValueError, match="unknown cache policy"):
        _core.policy_pick_victim("fifo", slots)


# --- settings


def test_budget_parsing():
    assert parse_size("6GiB") == 6 << 30 and parse_size("512 MiB") == 512 << 20 and parse_size("1.5G") == 1_500_000_000
    assert parse_budget(0.25, 1000) == 250 and parse_budget("50%", 1000) == 500 and parse_budget(123, 1000) == 123
    assert parse_budget("auto", 1000) is None
    for bad in ("lots", "5 parsecs", "-3"):
        with pytest.raises(ValueError):
            parse_budget(bad, 1000)
    with pytest.raises(ValueError, match="between 0 and 1"):
        parse_budget(1.5, 1000)


def test_auto_offload_decisions(dense_gguf, demo_gguf):
    moe, dense = summarize(demo_gguf), summarize(dense_gguf)
    assert not OffloadConfig.resolve(dense).enabled
    with pytest.raises(ValueError, match="dense model"):
        OffloadConfig.resolve(dense, offload="on")
    assert not OffloadConfig.resolve(moe, expert_budget="100GiB").enabled  # everything fits: fully resident
    small = OffloadConfig.resolve(moe, expert_budget=0.2)
    assert small.enabled and small.budget == int(0.2 * moe.expert_bytes)
    assert not OffloadConfig.resolve(moe, offload="off", expert_budget=0.2).enabled
    with pytest.raises(ValueError, match="static policy needs a usage profile"):
        Model(demo_gguf, offload="on", expert_budget=0.2, policy="static")


# --- stats and the command line


def test_stats_add_up(demo_gguf):
    with Model(demo_gguf, n_ctx=256, offload="on", expert_budget=0.3, policy="lfu") as m:
        m.generate("List three animals:", max_tokens=12, temperature=0)
        s = m.stats()["offload"]
        raw = m.offload_stats(raw=True)
    assert s["policy"] == "lfu" and s["tier"] == "disk"
    assert s["hits"] + s["misses"] == s["loads"] + s["direct"] + s["hits"]
    assert s["bytes_loaded"] == s["loads"] * int(summarize(demo_gguf).bytes_per_expert)
    assert len(raw["layers"]) == 30 and raw["expert_pairs"].shape == (30, 8)
    assert int(raw["expert_pairs"].sum()) == s["pairs"]
    assert s["bytes_moved_per_token"] > 0 and s["read_bandwidth"] > 0


def test_cli_offload_flags_and_stats(demo_gguf, tmp_path):
    proc = run_pymoe(
        "generate",
        str(demo_gguf),
        "-p",
        "The capital of France is",
        "-n",
        "8",
        "--temp",
        "0",
        "--offload",
        "on",
        "--expert-budget",
        "0.25",
        "--policy",
        "lfu",
        "--stats=layers",
        "--stats-json",
        str(tmp_path / "stats.json"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    report = json.loads((tmp_path / "stats.json").read_text())
    assert report["offload"]["policy"] == "lfu" and report["offload"]["hits"] > 0
    assert f"disk tier, lfu policy; {report['offload']['n_slots']} slots" in proc.stderr
    assert f"hit rate     {report['offload']['hit_rate']:.1%}" in proc.stderr
    assert len(re.findall(r"^ +\d+ +\d+% #*\.*", proc.stderr, re.M)) == 30  # --stats=layers: a line per layer

    info = run_pymoe("info", str(demo_gguf), "--expert-budget", "50%")
    assert info.returncode == 0 and "120 of 240 experts (50%) in slots" in info.stdout

    for args, message in (
        (["--expert-budget", "lots"], "cannot read 'lots' as a size"),
        (["--policy", "fifo"], "invalid choice"),
    ):
        bad = run_pymoe("generate", str(demo_gguf), "-p", "x", "-n", "1", "--offload", "on", *args)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr


def test_chat_stats_show_the_cache(demo_gguf):
    proc = run_pymoe(
        "chat",
        str(demo_gguf),
        "--temp",
        "0",
        "-n",
        "8",
        "--offload",
        "on",
        "--expert-budget",
        "0.5",
        input="Hi!\n/stats\n/stats layers\n/stats json\n/exit\n",
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stderr[proc.stderr.index("{") : proc.stderr.rindex("}") + 1])  # /stats json
    assert stats["offload"]["n_slots"] == 120 and stats["offload"]["hit_rate"] > 0
    summary = proc.stderr[: proc.stderr.index("{")]
    assert "disk tier, lru policy; 120 slots" in summary
    assert f"hit rate     {stats['offload']['hit_rate']:.1%}" in summary
    assert summary.count("\nlayer  hit rate") == 1 and len(re.findall(r"^ +\d+ +\d+% ", summary, re.M)) == 30


def test_replay_mode_routes_by_the_trace(tiny):
    """Benchmark mode: a trace's experts replace the router's, token by token and layer by layer."""
    path = tiny.gguf("mixtral")
    ids = np.random.default_rng(3).integers(0, 8, (20, 4, 2)).astype(np.int32)  # [rows, n_layer, k]
    with Model(path, offload="on", expert_budget=0.5, replay=ids) as m:
        m.logits(list(range(12)))  # one batch: rows 0..11
        for i in range(8):  # then token by token: rows 12..19
            m.next_token_logits(list(range(12 + i + 1)))
        pairs = m.offload_stats(raw=True)["expert_pairs"]
    expected = np.zeros((4, 8), np.uint64)
    for il in range(4):
        np.add.at(expected[il], ids[:, il, :].ravel(), 1)
    np.testing.assert_array_equal(pairs, expected)
    with pytest.raises(ValueError, match="offload"):
        Model(path, offload="off", replay=ids)
    with pytest.raises(ValueError, match="weights"):
        Model(path, offload="on", expert_budget=0.5, replay=(ids, np.ones((20, 4, 1), np.float32)))
    with pytest.raises(ValueError, match="replay trace"):
        Model(path, offload="on", expert_budget=0.5, replay=ids[:, :3])


TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


@pytest.mark.skipif(not TRACES.is_dir(), reason="the shared routing traces are not beside this checkout")
def test_real_traces_load():
    from pymoe.traces import load_trace

    mixtral = load_trace(TRACES / "mixtral8x7b-instruct-fp8_humaneval-p0-1_decode.jsonl")
    assert mixtral.experts.shape == (333, 32, 2) and mixtral.sequences == [(0, 81), (81, 333)]
    assert mixtral.n_expert == 8 and np.allclose(mixtral.weights.sum(-1), 1.0, atol=1e-3)
    assert mixtral.fit(n_layer=16, n_expert=8, k=2).shape == (333, 16, 2)
    with pytest.raises(ValueError, match="routing shape"):
        mixtral.fit(n_layer=4, n_expert=16, k=2)
    qwen = load_trace(
        sorted(p for p in TRACES.glob("qwen1.5-moe-a2.7b-chat_gsm8k25_layer*.jsonl") if "run2" not in p.name)
    )
    assert qwen.layers == [0, 8, 12, 18, 23] and qwen.experts.shape[1:] == (5, 4) and qwen.n_expert == 60
    assert qwen.n_tokens == 12805 - 8448  # the server's warm-up rows are dropped
