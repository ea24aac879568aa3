"""The eviction policies added for issue 11: Belady's optimal offline bound, the
decayed-frequency policy (lrfu) and the predicting one (markov), on traces small
enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest
from test_simulate import random_routing

from pymoe import Model, _core
from pymoe.offload import POLICIES

ONLINE = ("lru", "lfu", "lrfu", "markov", "multidim")


def hit_rate(ids, policy, slots_per_layer, n_expert, assist=False, weights=None):
    """Every miss loaded (no CPU assist): only the victims differ between policies."""
    n_layer = ids.shape[1]
    sim = _core.CacheSimulator(
        n_layer, n_expert, 1024, budget=1024 * slots_per_layer * n_layer, policy=policy, assist=assist
    )
    sim.run(ids, np.ones(ids.shape, np.float32) if weights is None else weights)
    r = sim.result()
    assert r["n_slots"] == slots_per_layer * n_layer
    return r["hits"], r["hits"] + r["misses"]


def test_belady_on_a_trace_whose_optimum_is_known():
    # one layer, 2 slots, experts 0 1 2 in a cycle, one per step: LRU always evicts
    # the one needed next and never hits. Farthest next use, by hand:
    #   t0-2: miss x3; at t2 {0,1} + 2: 0 is next used at t3, 1 at t4 -> evict 1
    #   t3 0 hit; t4 1 miss, {0,2}: 0 next at t6, 2 at t5 -> evict 0
    #   t5 2 hit; t6 0 miss, {1,2}: 1 next at t7, 2 at t8 -> evict 2
    #   t7 1 hit; t8 2 miss          -> 3 hits of 9, the optimum for this trace
    ids = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2], np.int32).reshape(9, 1, 1)
    assert hit_rate(ids, "belady", 2, 3) == (3, 9)
    assert hit_rate(ids, "lru", 2, 3) == (0, 9)
    # two experts a step (top-2 of 4, 3 slots): the step's own experts are never evicted
    #   t0 {0,1} miss x2; t1 {1,2}: 1 hit, 2 miss (free slot); t2 {2,3}: 2 hit, 3 miss,
    #   victims 0 (next at t3) or 1 (next at t4) -> evict 1; t3 {0,3}: hit x2;
    #   t4 {1,2}: 2 hit, 1 miss -> 5 hits of 10. LRU evicts 0 at t2 (older) and
    #   misses it at t3: 4 of 10.
    ids2 = np.array([[0, 1], [1, 2], [2, 3], [0, 3], [1, 2]], np.int32).reshape(5, 1, 2)
    assert hit_rate(ids2, "belady", 3, 4) == (5, 10)
    assert hit_rate(ids2, "lru", 3, 4) == (4, 10)


def test_belady_bounds_every_online_policy():
    for seed in range(3):
        ids, w = random_routing(n_tokens=300, n_layer=4, seed=seed)
        for slots in (3, 5):
            best, _ = hit_rate(ids, "belady", slots, 8, weights=w)
            for policy in ONLINE:
                assert hit_rate(ids, policy, slots, 8, weights=w)[0] <= best, (seed, slots, policy)


def test_belady_is_for_the_simulator_only(demo_gguf):
    assert _core.policy_needs_future("belady") and not any(_core.policy_needs_future(p) for p in ONLINE)
    assert "belady" in _core.policy_names() and "belady" not in POLICIES and "markov" in POLICIES
    with pytest.raises(ValueError, match="policy must be one of"):
        Model(demo_gguf, offload="on", expert_budget=0.3, policy="belady")
    # the engine itself refuses it, whoever builds its parameters
    p = _core.ModelParams()
    p.path = str(demo_gguf)
    p.n_ctx = 64
    p.offload.enabled = True
    p.offload.budget = 1 << 20
    p.offload.policy = "belady"
    with pytest.raises(ValueError, match="reads the future of a routing trace"):
        _core.Model(p)


def test_pick_victim_by_hand():
    # (layer, expert, last_use, uses, profile, hi_uses, recent, next_use, p_next)
    slots = [
        (0, 0, 9, 40, 0.0, 0, 0.9, 30, 0.50),  # used last, most uses, but its decayed frequency is low
        (0, 1, 3, 5, 0.0, 0, 2.5, 12, 0.10),  # oldest: LRU's victim; next used soonest
        (0, 2, 6, 9, 0.0, 0, 1.7, None, 0.30),  # never used again: Belady's victim
    ]
    assert _core.policy_pick_victim("lru", slots) == 1
    assert _core.policy_pick_victim("lfu", slots) == 1
    assert _core.policy_pick_victim("lrfu", slots) == 0  # smallest decayed frequency
    assert _core.policy_pick_victim("markov", slots) == 1  # least likely next
    assert _core.policy_pick_victim("belady", slots) == 2
    # ties: markov by decayed frequency, then recency; Belady by recency
    tie = [(0, 0, 5, 1, 0.0, 0, 1.0, 7, 0.2), (0, 1, 4, 1, 0.0, 0, 2.0, 7, 0.2), (0, 2, 3, 1, 0.0, 0, 1.0, 7, 0.2)]
    assert _core.policy_pick_victim("markov", tie) == 2
    assert _core.policy_pick_victim("belady", tie) == 2
    # background admission: the default compares decayed frequency; Belady the next use;
    # markov wants the newcomer likelier next and more used lately
    new, old = (0, 5, 9, 1, 0.0, 0, 1.5, 20, 0.4), (0, 6, 2, 9, 0.0, 0, 1.0, 10, 0.3)
    assert _core.policy_admit("lru", new, old) and not _core.policy_admit("belady", new, old)
    assert _core.policy_admit("markov", new, old)
    assert not _core.policy_admit("markov", new, (0, 6, 2, 9, 0.0, 0, 1.0, 10, 0.5))
    assert not _core.policy_admit("markov", new, (0, 6, 2, 9, 0.0, 0, 2.0, 10, 0.1))


def test_routing_model_by_hand():
    # one layer, 3 experts, counts halving every step (half-life 1), a prior of 1 step
    m = _core.RoutingModel(1, 3, half_life=1.0, prior=1.0, base_half_life=1.0)
    m.observe(0, [0], [1.0])
    m.observe(0, [1], [1.0])
    # frequency: expert 0 used one step ago (0.5), expert 1 now (1) over 1.5 decayed steps;
    # expert 1 has never been followed: its row says nothing, the prediction is the base rate
    assert [m.p_next(0, e) for e in range(3)] == pytest.approx([1 / 3, 2 / 3, 1e-3], rel=1e-6)
    m.observe(0, [0], [1.0])
    # base rate now 1.25 / 1.75 (expert 0), 0.5 / 1.75 (expert 1); expert 0 was followed by
    # expert 1 once, one step ago (weight 0.5): P(e | 0) = (0.5 [e = 1] + base_e) / (0.5 + 1)
    base = np.array([1.25, 0.5, 0.0]) / 1.75
    base[2] = 1e-3
    expect = (np.array([0.0, 0.5, 0.0]) + base) / 1.5
    got = [m.p_next(0, e) for e in range(3)]
    assert got == pytest.approx(expect.tolist(), rel=1e-6)
    # so after 0 1 0 markov keeps 1 over 0 (0.524 > 0.476) where LRU and lrfu keep 0
    assert got[1] > got[0] > got[2]


def test_the_base_rate_remembers_longer_with_more_experts():
    # the frequencies' half-life is 4 x n_expert layer steps unless given: a base rate over
    # many experts needs a longer window (docs/simulate.md: 32 steps for Mixtral's 8)
    def p_next(n_expert, **kw):
        m = _core.RoutingModel(1, n_expert, **kw)
        for e in [0, 1, 0, 2, 0, 1] * 5 + [2] * 10:
            m.observe(0, [e], [1.0])
        return [m.p_next(0, e) for e in range(3)]

    for n in (3, 16):
        assert p_next(n) == pytest.approx(p_next(n, base_half_life=4.0 * n), rel=1e-12)
        assert p_next(n) != pytest.approx(p_next(n, base_half_life=4.0 * n + 8), rel=1e-6)


def test_routing_model_reads_the_layers_below_by_hand():
    # three layers, two experts, one a step, counts that never decay, a prior of 1 step;
    # the tokens' (layer 0, layer 1, layer 2) experts:
    tokens = [(0, 0, 0), (1, 0, 1), (0, 0, 0)]
    # layer 2 learns, from token 1 to token 2 and from token 2 to token 3:
    #   its own step:   0 -> 1, 1 -> 0
    #   layer 1 below:  0 -> 1, 0 -> 0
    #   layer 0 below:  0 -> 1, 1 -> 0
    # base rate (2/3, 1/3); token 3 has 0 at every layer, so each source predicts from
    # expert 0: P(e | 0) = (count(0 -> e) + base_e) / (count(0) + 1), as a ratio to the base:
    #   own (1/3, 2/3) -> (1/2, 2); layer 1 (5/9, 4/9) -> (5/6, 4/3); layer 0 as own: (1/2, 2)
    own, layer1, layer0 = (1 / 2, 2), (5 / 6, 4 / 3), (1 / 2, 2)
    expect = {
        0: [2 / 3 * own[0], 1 / 3 * own[1]],  # its own last step only
        1: [2 / 3 * own[0] * layer1[0], 1 / 3 * own[1] * layer1[1]],  # and the layer below
        2: [2 / 3 * own[0] * layer1[0] * layer0[0], 1 / 3 * own[1] * layer1[1] * layer0[1]],
    }
    for depth, want in expect.items():
        m = _core.RoutingModel(3, 2, half_life=1e12, prior=1.0, depth=depth, base_half_life=1e12)
        for tok in tokens:
            for layer, e in enumerate(tok):
                m.observe(layer, [e], [1.0])
        assert [m.p_next(2, e) for e in range(2)] == pytest.approx(want, rel=1e-6), depth


def test_markov_decisions_on_a_tiny_trace():
    # one layer, 3 experts, 2 slots, one expert a step: cycles of "2 0 1 1 1 1 1 1",
    # then a last "2 0". Expert 2 is always followed by 0, while 1 is used far more.
    seq = ([2, 0] + [1] * 6) * 4 + [2, 0]
    ids = np.array(seq, np.int32).reshape(-1, 1, 1)
    # LRU: 2 evicts 0, 0 evicts 1 (older than 2), the first 1 misses: 5 hits a cycle
    assert hit_rate(ids, "lru", 2, 3) == (20, 34)
    # lrfu: 0 evicts 2 instead (rarer), so all six 1s hit: 23
    assert hit_rate(ids, "lrfu", 2, 3) == (23, 34)
    # markov decides as lrfu until it has seen "2 -> 0" often enough to outweigh its
    # prior (4 steps at the base rate): at each "2" its p_next(0) against p_next(1) is
    m = _core.RoutingModel(1, 3)
    at_two = []
    for e in seq:
        m.observe(0, [e], [1.0])
        if e == 2:
            at_two.append((m.p_next(0, 0), m.p_next(0, 1)))
    assert [p0 < p1 for p0, p1 in at_two[1:]] == [True, True, True, False]
    # so at the last "2" (the cache holds 0 and 1) it evicts 1 and hits 0 next: 24
    assert hit_rate(ids, "markov", 2, 3) == (24, 34)
    assert hit_rate(ids, "belady", 2, 3) == (26, 34)
