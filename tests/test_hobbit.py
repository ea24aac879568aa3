"""Mixed precision (a low-precision expert sidecar), the multidimensional
cache policy and next-layer prefetching (HOBBIT), and their pure parts."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pymoe import Model, _core

HIT, LOAD, DIRECT, HIT_LO, LOAD_LO = 0, 1, 2, 3, 4


# --- the planner's precision decisions


def test_planner_precision():
    thr = 0.3
    kw = dict(capacity=4, capacity_lo=4, lo_threshold=thr, expert_bytes=100, expert_bytes_lo=30)
    experts = [
        (0, 1, 0.9, True, False),  # important, high slot: hit
        (1, 1, 0.1, False, True),  # unimportant, low slot: low hit
        (2, 1, 0.9, False, True),  # important, only low: upgraded (loaded high)
        (3, 1, 0.1, False, False),  # unimportant miss: its low copy is loaded
        (4, 1, 0.6, False, False),  # important miss: loaded high
    ]
    assert _core.plan_layer(experts, **kw) == [HIT, HIT_LO, LOAD, LOAD_LO, LOAD]
    # no high slot left: the important ones are computed directly at high precision, never degraded
    assert _core.plan_layer(experts, **{**kw, "capacity": 0}) == [HIT, HIT_LO, DIRECT, LOAD_LO, DIRECT]
    # no low slot left: an unimportant miss may take a high slot
    assert _core.plan_layer(experts, **{**kw, "capacity_lo": 0}) == [HIT, HIT_LO, LOAD, LOAD, LOAD]
    # threshold 0: low precision is never used, even when a low copy is cached
    assert _core.plan_layer(experts, **{**kw, "lo_threshold": 0.0}) == [HIT, LOAD, LOAD, LOAD, LOAD]


def test_multidim_policy():
    # (layer, expert, last_use, uses, profile, hi_uses)
    slots = [
        (0, 0, 10, 40, 0.0, 40),  # recent, frequent, always wanted in high precision: kept
        (0, 1, 1, 40, 0.0, 40),  # old but frequent and important
        (0, 2, 9, 2, 0.0, 0),  # recent but rare and unimportant: the victim
        (0, 3, 2, 20, 0.0, 10),
    ]
    assert _core.policy_pick_victim("multidim", slots) == 2
    assert _core.policy_pick_victim("lru", slots) == 1
    # recency alone is LRU, frequency alone LFU
    assert _core.policy_pick_victim("multidim", slots, weights=(1.0, 0.0, 0.0)) == 1
    assert _core.policy_pick_victim("multidim", slots, weights=(0.0, 1.0, 0.0)) == 2
    # the precision term: among equals, the one least used in high precision goes
    eq = [(0, 0, 5, 10, 0.0, 9), (0, 1, 5, 10, 0.0, 1)]
    assert _core.policy_pick_victim("multidim", eq) == 1


def test_router_topk_matches_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 32)).astype(np.float32)  # [n_expert, n_embd]
    x = rng.standard_normal((3, 32)).astype(np.float32)  # [n_tokens, n_embd]
    got = dict(_core.router_topk(w, x, k=4))
    logits = x @ w.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want: dict[int, float] = {}
    for t in range(3):
        top = np.argsort(-p[t])[:4]
        for e in top:
            want[int(e)] = max(want.get(int(e), 0.0), float(p[t, e] / p[t, top].sum()))
    assert got.keys() == want.keys()
    for e in want:
        assert got[e] == pytest.approx(want[e], rel=1e-5)
    # a selection bias changes the choice (DeepSeek-V3), not the weights' source
    bias = np.zeros(16, np.float32)
    bias[15] = 100.0
    assert 15 in dict(_core.router_topk(w, x[:1], k=1, gating=2, bias=bias))


# --- the engine with a sidecar and with prefetching


@pytest.fixture(scope="module")
def mixtral_with_sidecar(tiny, tmp_path_factory):
    """The tiny Mixtral at f32 with a q4_0 expert sidecar, and the same checkpoint
    converted with q4_0 experts: what computing every pair in low precision must give."""
    from pymoe.convert import convert

    out = tmp_path_factory.mktemp("sidecar")
    ckpt = tiny.checkpoint("mixtral")
    convert(str(ckpt), out / "main.gguf", outtype="f32", expert_type="f32", lo_type="q4_0")
    convert(str(ckpt), out / "q4.gguf", outtype="f32", expert_type="q4_0", lo_type="q4_0")
    return out / "main.gguf", out / "main.lo.gguf", out / "q4.gguf"


def _tokens(m: Model, n: int = 32) -> list[int]:
    return np.random.default_rng(5).integers(0, m.n_vocab, n).tolist()


def test_threshold_zero_keeps_logits_exact(mixtral_with_sidecar):
    main, side, _ = mixtral_with_sidecar
    with Model(main, cache_type="f32", offload="off") as m:
        tokens = _tokens(m)
        ref = m.logits(tokens)
    with Model(
        main, cache_type="f32", offload="on", expert_budget=0.5, sidecar=side, lo_threshold=0.0, cpu_assist=False
    ) as m:
        np.testing.assert_array_equal(m.logits(tokens), ref)
        s = m.offload_stats()
        assert s["n_slots_lo"] > 0 and s["lo_pairs"] == 0


def test_low_precision_pairs_compute_the_low_copy(mixtral_with_sidecar):
    """Every pair below the threshold, every low copy in a slot: the logits are those of
    the model whose experts are the low type (computed by llama.cpp alone)."""
    main, side, q4 = mixtral_with_sidecar
    with Model(q4, cache_type="f32", offload="off") as m:
        tokens = _tokens(m)
        ref_lo = m.logits(tokens)
    with Model(
        main,
        cache_type="f32",
        offload="on",
        expert_budget=1.0,
        sidecar=side,
        lo_threshold=1.01,
        lo_share=0.5,
        cpu_assist=False,
    ) as m:
        out = m.logits(tokens)
        m.reset()
        steps = np.stack([m.next_token_logits(tokens[:i]) for i in range(1, 9)])
        s = m.offload_stats()
    assert s["lo_share_of_pairs"] == 1.0 and s["loads_lo"] > 0
    assert np.abs(out - ref_lo).max() <= 1e-4 * np.abs(ref_lo).max()
    assert np.abs(steps - ref_lo[:8]).max() <= 1e-3 * np.abs(ref_lo).max()


def test_mixed_precision_share_follows_the_threshold(mixtral_with_sidecar):
    main, side, _ = mixtral_with_sidecar
    shares = []
    for thr in (0.0, 0.3, 0.5, 1.01):
        with Model(
            main, cache_type="f32", offload="on", expert_budget=0.6, sidecar=side, lo_threshold=thr, cpu_assist=False
        ) as m:
            out = m.logits(_tokens(m))
            shares.append(m.offload_stats()["lo_share_of_pairs"])
        assert np.isfinite(out).all()
    assert shares[0] == 0.0 and shares == sorted(shares) and shares[-1] > shares[1]


def test_mismatched_sidecar_is_refused(mixtral_with_sidecar, tiny):
    _, side, _ = mixtral_with_sidecar
    with pytest.raises(ValueError, match="sidecar"):
        Model(tiny.gguf("olmoe"), offload="on", expert_budget=0.5, sidecar=side)


def test_prefetch_is_exact_and_predicts(demo_gguf):
    prompt = "The capital of France is"
    with Model(demo_gguf, n_ctx=256, offload="off") as m:
        expected = m.generate(prompt, max_tokens=16, temperature=0)
    with Model(demo_gguf, n_ctx=256, offload="on", expert_budget=0.5, prefetch=True, policy="multidim") as m:
        assert m.generate(prompt, max_tokens=16, temperature=0) == expected
        s = m.offload_stats()
    assert s["prefetch"] and s["prefetch_loads"] > 0
    # the next layer's router on this layer's hidden state predicts well on this model
    assert s["prefetch_precision"] > 0.5 and s["prefetch_recall"] > 0.5
    assert len(s["per_layer"]["prefetch_recall"]) == 30


def test_cli_mixed_precision_and_prefetch_flags(mixtral_with_sidecar, tmp_path):
    from conftest import run_pymoe

    main, side, _ = mixtral_with_sidecar
    tok = tmp_path / "t.txt"
    tok.write_text(" ".join(str(i) for i in range(1, 25)))
    proc = run_pymoe(
        "eval",
        str(main),
        "--tokens",
        str(tok),
        "--logits-out",
        str(tmp_path / "l.npy"),
        "--stats",
        "--stats-json",
        str(tmp_path / "stats.json"),
        "--offload",
        "on",
        "--expert-budget",
        "0.6",
        "--sidecar",
        str(side),
        "--lo-threshold",
        "0.45",
        "--no-cpu-assist",
        "--prefetch",
        "--policy",
        "multidim",
    )
    assert proc.returncode == 0, proc.stderr
    import json

    off = json.loads((tmp_path / "stats.json").read_text())["offload"]
    assert off["policy"] == "multidim" and off["n_slots_lo"] > 0 and off["lo_pairs"] > 0 and off["prefetch"]
    # the summary shows what is in use: low-precision slots and pairs, prefetching
    assert f"+ {off['n_slots_lo']} low-precision" in proc.stderr
    assert f"{off['lo_share_of_pairs']:.0%} in low precision" in proc.stderr
    assert re.search(r"^prefetch +on; nothing predicted yet$", proc.stderr, re.M)  # one batch: too big to predict
    bad = run_pymoe(
        "eval",
        str(main),
        "--tokens",
        str(tok),
        "--logits-out",
        str(tmp_path / "m.npy"),
        "--offload",
        "on",
        "--sidecar",
        str(tmp_path / "missing.gguf"),
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr


def test_replayed_weights_drive_the_precision(mixtral_with_sidecar):
    """Benchmark mode with a trace's gate weights: the planner weighs those,
    not the random router's (relative to the token's top-k sum)."""
    main, side, _ = mixtral_with_sidecar
    with Model(main, offload="off") as m:
        n_layer, tokens = m.info()["n_layer"], _tokens(m)
    ids = np.tile(np.array([0, 1], np.int32), (len(tokens), n_layer, 1))
    shares = []
    for second in (0.5, 0.1):  # relative weight of the second expert: above, then below the threshold
        w = np.tile(np.array([1.0 - second, second], np.float32), (len(tokens), n_layer, 1))
        with Model(main, offload="on", expert_budget=0.5, sidecar=side, lo_threshold=0.2, replay=(ids, w)) as m:
            m.logits(tokens)
            shares.append(m.offload_stats()["lo_share_of_pairs"])
    assert shares == [0.0, 0.5]
