"""pymoe.Model on a real model (SmolLM2-135M-Instruct, Q4_1)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from pymoe import Model


@pytest.fixture(scope="module")
def model(dense_gguf):
    with Model(dense_gguf, n_ctx=512) as m:
        yield m


def test_tokenize_roundtrip(model):
    text = "Mixture-of-Experts, in llama.cpp: 42 experts!"
    tokens = model.tokenize(text, add_bos=False)
    assert all(isinstance(t, int) for t in tokens)
    assert model.detokenize(tokens) == text


def test_greedy_is_deterministic_and_answers(model):
    a = model.generate("The capital of France is", max_tokens=12, temperature=0)
    b = model.generate("The capital of France is", max_tokens=12, temperature=0)
    assert a == b
    assert "Paris" in a


def test_seeded_sampling_repeats(model):
    kw = dict(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = model.generate("Once upon a time", seed=7, **kw)
    b = model.generate("Once upon a time", seed=7, **kw)
    c = model.generate("Once upon a time", seed=8, **kw)
    assert a == b
    assert a != c  # 16 tokens from the full distribution: equal only by a wild chance


def test_streaming_matches_full_text(model):
    pieces = list(model.stream("List three colours:", max_tokens=20, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate("List three colours:", max_tokens=20, temperature=0)


def test_stop_string_cuts_the_text(model):
    full = model.generate("The capital of France is", max_tokens=12, temperature=0)
    word = full.strip().split()[0][:3]
    cut = model.generate("The capital of France is", max_tokens=12, temperature=0, stop=[word])
    assert word not in cut
    assert full.startswith(cut)
    assert model.last_stats.finish_reason == "stop"


def test_prefix_reuse_gives_the_same_logits(model):
    tokens = model.tokenize("The quick brown fox jumps over the lazy dog")
    full = model.logits(tokens)
    assert full.shape == (len(tokens), model.n_vocab)
    assert full.dtype == np.float32
    # a generate call over the same prompt reuses the cached prefix; the next
    # teacher-forced pass from scratch must not be affected by that
    model.generate(tokens, max_tokens=3, temperature=0)
    assert model.last_stats.cached_tokens == len(tokens) - 1
    again = model.logits(tokens)
    np.testing.assert_array_equal(full, again)


def test_incremental_decode_matches_batch(model):
    tokens = model.tokenize("One two three four five six")
    batch = model.logits(tokens)
    model.reset()
    for i in range(1, len(tokens) + 1):
        row = model.next_token_logits(tokens[:i])  # evaluates one new token on the cached prefix
        np.testing.assert_allclose(row, batch[i - 1], rtol=0, atol=2e-3)
    assert len(model._past) == len(tokens)


def test_chat_uses_the_template(model):
    prompt = model.format_chat([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user\nhi<|im_end|>" in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    answer = model.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0)
    assert "Paris" in answer


def test_perplexity_is_finite_and_plausible(model):
    text = ("The cat sat on the mat. The dog sat on the rug. " * 40).strip()
    res = model.perplexity(model.tokenize(text, add_bos=False), n_ctx=128)
    assert res.n_chunks >= 2
    assert 1.0 < res.perplexity < 20.0  # repeated text is easy to predict


def test_bad_tokens_and_prompts_are_rejected(model):
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        model.logits([1, model.n_vocab])
    with pytest.raises(ValueError, match="empty"):
        model.generate([], max_tokens=1)
    with pytest.raises(ValueError, match="context"):
        model.generate(list(range(600)), max_tokens=1)
    with pytest.raises(ValueError, match="messages"):
        model.chat([], max_tokens=1)


def test_info_and_metadata(model):
    info = model.info()
    assert info["architecture"] == "llama"
    assert info["n_expert"] == 0
    assert "no experts" in info["note"]
    assert model.metadata["general.architecture"] == "llama"


def test_closed_model_raises(dense_gguf):
    m = Model(dense_gguf, n_ctx=128)
    with m:
        pass
    assert m.closed
    with pytest.raises(ValueError, match="closed"):
        m.generate("hi", max_tokens=1)


def test_native_abort_flag_stops_a_decode_and_leaves_the_cache_as_before(model):
    tokens = model.tokenize("The quick brown fox jumps over the lazy dog")
    expected = model.logits(tokens)
    model.reset()
    model.next_token_logits(tokens[:4])
    model._native.set_abort(True)
    try:
        with pytest.raises(RuntimeError, match="aborted"):
            model._native.decode(
                np.asarray(tokens[4:], np.int32),
                np.arange(4, len(tokens), dtype=np.int32),
                np.zeros(len(tokens) - 4, np.int32),
                np.ones(len(tokens) - 4, np.int8),
            )
    finally:
        model._native.set_abort(False)
    # the cache holds the first four tokens only: the rest evaluated on them gives the same logits
    rest = model._native.decode(
        np.asarray(tokens[4:], np.int32),
        np.arange(4, len(tokens), dtype=np.int32),
        np.zeros(len(tokens) - 4, np.int32),
        np.ones(len(tokens) - 4, np.int8),
    )
    np.testing.assert_allclose(rest, expected[4:], rtol=0, atol=2e-3)
    model.reset()


def _pairs_routed(m: Model) -> int:
    return int(np.asarray(m.offload_stats(raw=True)["expert_pairs"]).sum())


@pytest.mark.parametrize("offload", [dict(expert_budget=1.0), dict(expert_budget=0.3, prefetch=True)])
def test_ctrl_c_stops_a_long_prompt_and_keeps_the_cache_of_the_turns_before(demo_gguf, offload):
    """Ctrl-C while a prompt is evaluated stops it within a graph node (llama.cpp's abort
    callback), not after the whole prompt; the KV cache keeps the earlier turns only, and the
    expert engine stopped mid-step computes the next turn exactly."""
    with Model(demo_gguf, n_ctx=4096, n_batch=16, n_ubatch=16, n_threads=1, offload="on", **offload) as m:
        first = [{"role": "user", "content": "What is the capital of France?"}]
        answer = m.chat(first, max_tokens=8, temperature=0)
        history = [*first, {"role": "assistant", "content": answer}]
        long = [*history, {"role": "user", "content": "Summarise: " + " ".join(f"w{i % 97}" for i in range(1100))}]
        n_new = len(m.chat_tokens(long)) - len(m.chat_tokens(first))
        pairs = _pairs_routed(m)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # as a terminal sends Ctrl-C
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            m.chat(long, max_tokens=8, temperature=0)
        timer.join()
        assert m.last_stats.finish_reason == "interrupted"
        routed = (_pairs_routed(m) - pairs) / (m.n_layer * m.summary.n_expert_used)  # tokens that reached the experts
        assert routed < n_new / 2, (routed, n_new, time.monotonic() - t0)

        again = [*history, {"role": "user", "content": "And of Germany?"}]
        text = m.chat(again, max_tokens=8, temperature=0)
        assert m.last_stats.cached_tokens >= len(m.chat_tokens(first))  # the turns before were kept
        with Model(demo_gguf, n_ctx=4096, n_batch=16, n_ubatch=16, n_threads=1) as fresh:
            assert fresh.chat(again, max_tokens=8, temperature=0) == text


def test_ctrl_c_before_the_answer_leaves_the_conversation_as_it_was(demo_gguf):
    from pymoe import Conversation

    with Model(demo_gguf, n_ctx=4096, n_batch=16, n_ubatch=16, n_threads=1) as m:
        conv = Conversation(m, system="Be brief.", max_tokens=8, temperature=0)
        answer = "".join(conv.send("What is the capital of France?"))
        history = list(conv.messages)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            for _ in conv.send("Summarise: " + " ".join(f"w{i % 97}" for i in range(1100))):
                pass
        timer.join()
        assert conv.messages == history and conv.dropped_turns == 0
        assert history[-1] == {"role": "assistant", "content": answer}
