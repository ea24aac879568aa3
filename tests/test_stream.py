"""The disk tier's stream (native/pymoe-stream.*, patch 0007): the direct
branch's experts read from the file into a ring of buffers ahead of the CPU
instead of faulted in through the mapping. Bit-exact against offload off, the
stream carries every direct expert, the mapping stays unread, and a failed
read falls back to the mapping without changing a logit."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from pymoe import Model, _core

N_TOKENS = 40  # a prefill ubatch that needs most experts of a layer
N_STEPS = 8


@pytest.fixture(autouse=True)
def _no_fault_left_armed():
    yield
    _core.io_fault_clear()


def _run(m: Model, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    batch = m.logits(tokens)
    m.reset()
    steps = np.stack([m.next_token_logits(tokens[: i + 1]) for i in range(N_STEPS)])
    return batch, steps


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("budget", [0, 0.25])
def test_streamed_experts_are_exact_and_all_streamed(tiny, arch, budget):
    path = tiny.gguf(arch)
    with Model(path, cache_type="f32", offload="off") as m:
        tokens = np.random.default_rng(5).integers(0, m.n_vocab, N_TOKENS).tolist()
        ref = _run(m, tokens)
    on = {"cache_type": "f32", "offload": "on", "offload_tier": "disk", "expert_budget": budget}
    for stream in (True, False):
        with Model(path, stream=stream, **on) as m:
            got = _run(m, tokens)
            s = m.offload_stats()
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        assert s["direct"] > 0
        if stream:
            # every expert the direct branch computed came from the stream, in the CPU's order
            assert s["bytes_streamed"] == s["bytes_direct"]
            assert s["stream_fallbacks"] == 0
        else:
            assert s["bytes_streamed"] == 0


def _faults_while_decoding(path, **kw) -> tuple[int, dict]:
    with Model(path, n_ctx=256, offload="on", expert_budget=0, offload_tier="disk", **kw) as m:
        m.generate("Once upon a time", max_tokens=2, temperature=0)  # start-up, the ring's first touch
        m.reset_stats()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        m.generate("Once upon a time there was", max_tokens=8, temperature=0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return r1.ru_minflt + r1.ru_majflt - r0.ru_minflt - r0.ru_majflt, m.offload_stats()


def test_the_stream_leaves_the_mapping_unread(demo_gguf):
    """Budget 0: every expert is computed in place, none through the mapping: the decode takes
    page faults by the hundred (Python, buffers), not one per page of the experts it computed
    (measured here: ~300 with the stream, ~16,000 without, for 1.3 GB of experts)."""
    faults, s = _faults_while_decoding(demo_gguf)
    assert s["bytes_streamed"] == s["bytes_direct"] > 0
    assert faults < s["bytes_direct"] / 4096 / 50
    faults_mapped, s = _faults_while_decoding(demo_gguf, stream=False)
    assert s["bytes_streamed"] == 0 and faults_mapped > faults


@pytest.mark.parametrize("kind", ["eio", "short"])
def test_a_failed_stream_read_falls_back_to_the_mapping(tiny, kind):
    path = tiny.gguf("mixtral")
    with Model(path, cache_type="f32", offload="off") as m:
        tokens = np.random.default_rng(9).integers(0, m.n_vocab, N_TOKENS).tolist()
        ref = m.logits(tokens)
    with Model(path, cache_type="f32", offload="on", offload_tier="disk", expert_budget=0) as m:
        m.logits(tokens[:2])  # start-up (its bandwidth measurement reads too) before the fault is armed
        m.reset_stats()
        _core.io_fault(kind, 3, 4)  # some of the stream's reads fail
        np.testing.assert_array_equal(m.logits(tokens), ref)
        s = m.offload_stats()
        assert s["stream_fallbacks"] > 0
        assert s["bytes_streamed"] < s["bytes_direct"]


def test_the_stream_follows_the_cpus_order_and_learns_it(tiny):
    """The stream alone (no model loaded): it reads what it is told in its order, hands over
    exactly the file's bytes, drops what the CPU skipped (the CPU then computes it from the
    mapping), and reads the next layer in the order the CPU asked for the last one."""
    path = str(tiny.gguf("mixtral"))
    want = {(il, e): _core.expert_read(path, il, e) for il in (0, 1) for e in (1, 3)}  # gate, up, down
    in_order = [(j, e) for j in (0, 1, 2) for e in (1, 3)]
    got, fallbacks = _core.stream_probe(path, [(0, [3, 1], in_order)])
    assert got == [want[0, e][j] for j, e in in_order] and fallbacks == 0

    up_first = [(j, e) for j in (1, 0, 2) for e in (1, 3)]  # the graph computes up before gate
    got, fallbacks = _core.stream_probe(path, [(0, [1, 3], up_first), (1, [1, 3], up_first)])
    layer0, layer1 = got[:6], got[6:]
    assert layer0[:2] == [want[0, 1][1], want[0, 3][1]]  # up: streamed
    assert layer0[2:4] == [b"", b""]  # gate was read ahead, then dropped: the mapping serves it
    assert layer0[4:] == [want[0, 1][2], want[0, 3][2]]
    assert layer1 == [want[1, e][j] for j, e in up_first]  # learned: nothing dropped
    assert fallbacks == 2

    got, fallbacks = _core.stream_probe(path, [(0, [1], [(0, 1), (0, 2)])])  # expert 2 was not named
    assert got == [want[0, 1][0], b""] and fallbacks == 1
