"""Adaptive top-k (`skip_threshold`): a missed expert of little gate weight is
left out. Checked against transformers running the same checkpoint with those
pairs' routing weights zeroed (and renormalised), which pymoe matches to ~1e-6
when nothing is skipped (test_transformers_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hf_models import reference_logits

from pymoe import Model

N_TOKENS = 24


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def skipped_reference(checkpoint, tokens: list[int], threshold: float, renormalize: bool, per: str):
    """transformers' logits with the router's top-k weights below `threshold` zeroed: per pair (`per="pair"`,
    what one-token decode steps do) or per expert whose largest weight in the batch is below it
    (`per="batch"`, one ubatch). Returns the logits, the pairs zeroed and every relative weight seen."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    seen: list[np.ndarray] = []
    zeroed = [0]

    def hook(module, args, output):
        logits, scores, index = output
        rel = scores / scores.sum(dim=-1, keepdim=True)
        seen.append(rel.numpy().ravel().copy())
        if per == "pair":
            drop = rel < threshold
        else:
            best = torch.zeros(module.num_experts).scatter_reduce(0, index.ravel(), rel.ravel(), reduce="amax")
            drop = best[index] < threshold
        zeroed[0] += int(drop.sum())
        kept = scores.masked_fill(drop, 0.0)
        if renormalize:
            kept = kept * scores.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True)
        return logits, kept, index

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)
    with torch.no_grad():
        out = model(torch.tensor([tokens], dtype=torch.long)).logits[0].float().numpy()
    return out, zeroed[0], np.concatenate(seen)


def clear_threshold(weights: np.ndarray, lo: float = 0.2, hi: float = 0.45) -> float:
    """A threshold in [lo, hi] far from every weight seen (the middle of the widest gap), so that float
    differences between the two implementations cannot flip a decision."""
    w = np.sort(weights[(weights > lo) & (weights < hi)])
    edges = np.concatenate([[lo], w, [hi]])
    i = int(np.argmax(np.diff(edges)))
    assert edges[i + 1] - edges[i] > 2e-3
    return float((edges[i] + edges[i + 1]) / 2)


@pytest.fixture(scope="module")
def mixtral(tiny):
    gguf, ckpt = tiny.gguf("mixtral"), tiny.checkpoint("mixtral")
    with Model(gguf, cache_type="f32", offload="off") as m:
        tokens = np.random.default_rng(5).integers(0, m.n_vocab, N_TOKENS).tolist()
        batch = m.logits(tokens)
        steps = np.stack([m.next_token_logits(tokens[: i + 1]) for i in range(N_TOKENS)])
    _, _, weights = skipped_reference(ckpt, tokens, 0.0, False, "pair")
    threshold = clear_threshold(weights)
    return gguf, ckpt, tokens, batch, steps, threshold, int((weights < threshold).sum())


def test_threshold_zero_is_exact(mixtral):
    gguf, _, tokens, batch, steps, _, _ = mixtral
    with Model(gguf, cache_type="f32", offload="on", expert_budget=0, skip_threshold=0.0) as m:
        assert np.array_equal(m.logits(tokens), batch)
        m.reset()
        assert np.array_equal(np.stack([m.next_token_logits(tokens[: i + 1]) for i in range(N_TOKENS)]), steps)
        assert m.offload_stats()["skipped"] == 0


@pytest.mark.parametrize("renormalize", [False, True])
def test_skipped_pairs_match_zeroed_weights(mixtral, renormalize):
    gguf, ckpt, tokens, _, steps, threshold, below = mixtral
    # budget 0: every expert is a miss, so every pair below the threshold is skipped
    kw = {"offload": "on", "expert_budget": 0, "skip_threshold": threshold, "skip_renormalize": renormalize}
    with Model(gguf, cache_type="f32", **kw) as m:
        ours_steps = np.stack([m.next_token_logits(tokens[: i + 1]) for i in range(N_TOKENS)])
        step_stats = m.offload_stats()
        m.reset_stats()
        ours_batch = m.logits(tokens)
        batch_stats = m.offload_stats()
    ref_steps, zeroed_steps, _ = skipped_reference(ckpt, tokens, threshold, renormalize, "pair")
    ref_batch, zeroed_batch, _ = skipped_reference(ckpt, tokens, threshold, renormalize, "batch")
    assert step_stats["skipped_pairs"] == zeroed_steps == below == step_stats["skipped"] > 0
    assert batch_stats["skipped_pairs"] == zeroed_batch < below  # in a batch an expert any token needs is kept
    for s in (step_stats, batch_stats):
        assert s["pairs"] == s["direct_pairs"] + s["skipped_pairs"] and s["misses"] == s["direct"] + s["skipped"]
    # the same logits as transformers with those weights zeroed; far from the unskipped ones
    assert relative_error(ours_steps, ref_steps) <= 1e-4
    assert relative_error(ours_batch, ref_batch) <= 1e-4
    assert relative_error(ours_steps, steps) > 1e-2
    assert relative_error(ref_steps, reference_logits(ckpt, tokens)) > 1e-2


def test_hits_are_never_skipped(mixtral):
    gguf, _, tokens, _, _, threshold, below = mixtral
    # every expert fits and every miss above the threshold takes a slot: once loaded, an expert is a hit
    # and runs whatever its weight
    kw = {"offload": "on", "expert_budget": 1.0, "cpu_assist": False, "skip_threshold": threshold}
    with Model(gguf, cache_type="f32", **kw) as m:
        for i in range(N_TOKENS):
            m.next_token_logits(tokens[: i + 1])
        s = m.offload_stats()
    assert s["hits"] > 0 and 0 < s["skipped_pairs"] < below
    assert s["pairs"] == s["pool_pairs"] + s["direct_pairs"] + s["skipped_pairs"]
    assert s["misses"] == s["loads"] + s["direct"] + s["skipped"]


def test_threshold_is_checked():
    from pymoe import Settings

    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="skip_threshold"):
            Settings(skip_threshold=bad)


def test_the_summary_says_what_was_skipped(mixtral):
    from pymoe import stats

    gguf, _, tokens, _, _, threshold, _ = mixtral
    with Model(gguf, offload="on", expert_budget=0, skip_threshold=threshold) as m:
        for i in range(4):
            m.next_token_logits(tokens[: i + 1])
        s = m.offload_stats()
    share = f"{s['skipped_pairs'] / s['pairs']:.0%}"
    assert s["skipped_pairs"] > 0 and f"; {share} skipped (--skip-threshold)" in stats.summary(s, None)
