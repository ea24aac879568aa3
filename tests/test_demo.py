"""The built-in demo: SmolLM2-135M-Instruct upcycled into an 8-expert MoE
speaks exactly like the dense model it came from."""

from __future__ import annotations

import pytest

from pymoe import Model, summarize
from pymoe.upcycle import UpcycleError, upcycle

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


def test_demo_is_a_moe(demo_gguf, dense_gguf):
    s = summarize(demo_gguf)
    assert s.architecture == "llama"
    assert (s.n_expert, s.n_expert_used) == (8, 2)
    assert len(s.moe_layers) == s.n_layer == 30
    assert s.expert_bytes == 8 * sum(
        t.nbytes for t in summarize(dense_gguf).tensors if ".ffn_" in t.name and "norm" not in t.name
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_upcycled_greedy_text_equals_dense(demo_gguf, dense_gguf, prompt):
    with Model(dense_gguf, n_ctx=256) as dense:
        expected = dense.generate(prompt, max_tokens=32, temperature=0)
    with Model(demo_gguf, n_ctx=256) as moe:
        got = moe.generate(prompt, max_tokens=32, temperature=0)
    assert got == expected


def test_upcycled_chat_answers(demo_gguf):
    with Model(demo_gguf, n_ctx=512) as m:
        answer = m.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0)
    assert "Paris" in answer


def test_upcycle_refuses_bad_input(demo_gguf, dense_gguf, tmp_path):
    with pytest.raises(UpcycleError, match="already a MoE"):
        upcycle(demo_gguf, tmp_path / "x.gguf")
    with pytest.raises(UpcycleError, match="n_expert_used"):
        upcycle(dense_gguf, tmp_path / "x.gguf", n_expert=2, n_expert_used=3)
    with pytest.raises(FileExistsError, match="input"):
        upcycle(dense_gguf, dense_gguf, force=True)
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        upcycle(dense_gguf, existing)
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]  # no temporary left behind


def test_upcycled_logits_are_bit_identical(demo_gguf, dense_gguf):
    import numpy as np

    with Model(dense_gguf, n_ctx=256) as dense, Model(demo_gguf, n_ctx=256) as moe:
        tokens = dense.tokenize("The quick brown fox jumps over the lazy dog. def f(n): return n + 1")
        np.testing.assert_array_equal(moe.logits(tokens), dense.logits(tokens))  # a batch
        np.testing.assert_array_equal(moe.logits(tokens[:1]), dense.logits(tokens[:1]))  # one token


def test_ungrouped_router_varies_weights_and_keeps_the_text(dense_gguf, tmp_path):
    """For mixed-precision studies: every expert its own router row; weights vary, the model still speaks."""
    out = upcycle(dense_gguf, tmp_path / "ungrouped.gguf", n_expert=8, n_expert_used=2, grouped=False)
    with Model(dense_gguf, n_ctx=256) as dense, Model(out, n_ctx=256) as moe:
        prompt = "The capital of France is"
        assert "Paris" in moe.generate(prompt, max_tokens=8, temperature=0)
        tokens = dense.tokenize(prompt)
        import numpy as np

        diff = np.abs(moe.logits(tokens) - dense.logits(tokens)).max()
        assert diff < 1e-2  # equal up to rounding: sum of identical experts with weights summing to one
