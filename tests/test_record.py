"""--record-routing: the engine writes its routing natively; pymoe.traces reads
it and `pymoe simulate` replays it through the same cache and planner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_pymoe

from pymoe import Model, stats
from pymoe.simulate import simulate
from pymoe.traces import load_trace

PROMPT = "Tell me about the history of Paris."


def record(demo_gguf, path, **settings):
    kw = {"n_ctx": 256, "offload": "on", "expert_budget": 0.5, "record_routing": str(path), "n_threads": 2}
    with Model(demo_gguf, **{**kw, **settings}) as m:
        m.generate(PROMPT, max_tokens=20, temperature=0)
        raw = m.offload_stats(raw=True)
    return stats.totals(raw["layers"]), raw


@pytest.mark.parametrize("policy", ["lru", "markov"])
def test_a_recording_replays_to_the_engines_own_counts(demo_gguf, tmp_path, policy):
    # every miss loaded (a CPU has no cheaper place to compute it from the disk tier either)
    path = tmp_path / "run.routes"
    engine, raw = record(demo_gguf, path, policy=policy, cpu_assist=False)
    trace = load_trace(path)
    assert trace.layers == list(range(30)) and trace.n_expert == 8 and trace.k == 2
    assert trace.ubatches[0] > 1 and set(trace.ubatches[1:]) == {1}  # the prompt, then one token a step
    assert trace.model == demo_gguf.name and trace.expert_bytes == raw["pool_bytes"] // raw["n_slots"]
    assert trace.guesses is not None and len(trace.guesses) == 0  # prefetching was off
    # the last layer of the prompt computes only the row whose logits are wanted
    first = trace.experts[: trace.ubatches[0]]
    assert (first[:-1, -1] == -1).all() and (first[-1] >= 0).all() and (first[:, :-1] >= 0).all()
    assert int((trace.experts >= 0).all(axis=2).sum()) * 2 == engine["pairs"]
    assert engine["record_seconds"] > 0  # the engine's clock around the recorder (tools/record_overhead.py)
    sim = simulate(trace, budget=0.5, policy=policy, cpu_assist=False)
    assert sim.n_slots == raw["n_slots"] and sim.tokens == sum(trace.ubatches)
    # the same planner, cache and policy on the same routing: the same decisions
    assert (sim.loads, sim.direct) == (engine["loads"], engine["direct"])
    assert sim.hit_rate == pytest.approx(stats.hit_rate(engine), abs=1e-12)
    # the gate weights are the router's: each token's top-2 of a softmax
    w = trace.weights[trace.experts[..., 0] >= 0]
    assert ((w > 0) & (w < 1)).all() and (w.sum(axis=1) <= 1.0 + 1e-5).all()
    # replaying it into the engine (benchmark mode) drops the rows a layer skipped
    ids, weights = trace.fit_routes(30, 8, 2)
    assert ids.shape == weights.shape == (sum(trace.ubatches) - trace.ubatches[0] + 1, 30, 2) and (ids >= 0).all()


def test_prefetch_guesses_are_recorded_and_modelled(demo_gguf, tmp_path):
    path = tmp_path / "prefetch.routes"
    engine, _ = record(demo_gguf, path, prefetch=True, cpu_assist=False)
    head = json.loads(path.read_bytes().split(b"\n", 1)[0])
    assert head["format"] == "pymoe-routing" and head["prefetch_depth"] == 1 and head["n_expert_used"] == 2
    trace = load_trace(path)
    g = trace.guesses
    assert g is not None and len(g) > 0 and g.shape[1] == 4
    assert (g[:, 2] > g[:, 1]).all() and (g[:, 2] == g[:, 1] + 1).all()  # depth 1: the next layer
    # the predictor guesses k experts per decode token and layer (none for the prompt)
    assert len(g) == engine["prefetch_predicted"]
    with_guesses = simulate(trace, budget=0.5, cpu_assist=False)
    without = simulate(trace, budget=0.5, cpu_assist=False, prefetch=False)
    assert with_guesses.prefetch_loads > 0 and 0 < with_guesses.prefetch_hits <= with_guesses.prefetch_loads
    assert without.prefetch_loads == 0 and without.prefetch_hits == 0
    # guessed experts loaded in the background are hits the foreground did not have to load
    assert with_guesses.hit_rate > without.hit_rate and with_guesses.loads < without.loads
    # a slower link: the background loads land later, and the steps wait for them
    slow = simulate(trace, budget=0.5, cpu_assist=False, link_gbps=0.5)
    assert slow.prefetch_wait_per_token_s > with_guesses.prefetch_wait_per_token_s


def test_cli_records_and_simulates(demo_gguf, tmp_path):
    path = tmp_path / "cli.routes"
    gen = run_pymoe(
        "generate", str(demo_gguf), "-p", "The capital of France is", "-n", "6", "--temp", "0",
        "--record-routing", str(path), "-t", "2",
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert path.is_file()
    sim = run_pymoe("simulate", "--trace", str(path), "--budget", "0.5", "--policy", "markov", "--json")
    assert sim.returncode == 0, sim.stderr
    res = json.loads(sim.stdout)
    assert res["policy"] == "markov" and res["preset"] == demo_gguf.name and res["layers"] == 30
    assert 0.0 <= res["hit_rate"] <= res["bound_hit_rate"] <= 1.0
    text = run_pymoe("simulate", "--trace", str(path), "--budget", "0.5")
    assert text.returncode == 0 and "optimal offline, Belady" in text.stdout

    off = run_pymoe("generate", str(demo_gguf), "-p", "x", "-n", "1", "--offload", "off", "--record-routing", str(path))
    assert off.returncode != 0 and "needs the expert engine" in off.stderr and "Traceback" not in off.stderr
    nowhere = run_pymoe("generate", str(demo_gguf), "-p", "x", "-n", "1", "--record-routing", str(tmp_path / "no/x"))
    assert nowhere.returncode != 0 and "cannot write the routing record" in nowhere.stderr


def test_a_cut_record_keeps_its_whole_ubatches(demo_gguf, tmp_path):
    path = tmp_path / "cut.routes"
    record(demo_gguf, path, cpu_assist=False)
    full = load_trace(path)
    data = path.read_bytes()
    cut = tmp_path / "cut2.routes"
    cut.write_bytes(data[: len(data) - 1000])  # a run killed while writing
    part = load_trace(cut)
    assert 0 < len(part.ubatches) < len(full.ubatches)
    n = sum(part.ubatches)
    np.testing.assert_array_equal(part.experts, full.experts[:n])
    bad = tmp_path / "bad.routes"
    bad.write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match="not a routing trace"):
        load_trace(bad)


def test_bench_records_its_last_offloaded_configuration(demo_gguf, tmp_path):
    path = tmp_path / "bench.routes"
    args = ("bench", str(demo_gguf), "-p", "8", "-n", "3", "-t", "2", "--no-warmup", "--record-routing", str(path))
    proc = run_pymoe(*args, "--budgets", "0.25,0.5,off", "--json")
    assert proc.returncode == 0, proc.stderr
    trace = load_trace(path)
    # one configuration's run (the 0.5 one): the prompt in one ubatch, then the decode steps
    assert trace.ubatches == [8, 1, 1, 1]
    off = run_pymoe(*args, "--budgets", "off")
    assert off.returncode != 0 and "needs a budget with offload on" in off.stderr and "Traceback" not in off.stderr
