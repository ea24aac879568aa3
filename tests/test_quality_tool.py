"""Smoke test of tools/quality_mixed_precision.py's pieces on the tiny random Mixtral."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool

from pymoe import Model

THRESHOLDS = [0.3, 0.5, 1.01]


@pytest.fixture(scope="module")
def tool():
    return load_tool("quality_mixed_precision")


@pytest.fixture(scope="module")
def tiny_mixed(tool, tiny, tmp_path_factory):
    ckpt = tiny.checkpoint("mixtral")
    return (ckpt, *tool.random_model(tmp_path_factory.mktemp("quality"), ckpt, "q2_K"))


def test_chunks_and_metrics_reproduce_model_perplexity(tool, tiny_mixed):
    _, main, _ = tiny_mixed
    with Model(main, n_ctx=32, offload="off") as m:
        tokens = m.tokenize("The quick brown fox jumps over the lazy dog. " * 12, add_bos=False)
        want = m.perplexity(tokens, n_ctx=16)
        probe = m.tokenize("", add_bos=True)
        chunks = tool.perplexity_chunks(tokens, 16, int(probe[0]) if probe else None, 0)
        nll = [
            tool.position_metrics(m.logits(c)[7:15], np.asarray(tokens[i * 16 : (i + 1) * 16])[8:], None)["nll"]
            for i, c in chunks
        ]
    assert len(chunks) == want.n_chunks
    assert np.exp(np.concatenate(nll).mean()) == pytest.approx(want.perplexity, rel=1e-12)
    # spread picks: first and last chunk, sorted, no repeats
    picks = [i for i, _ in tool.perplexity_chunks(tokens, 16, None, 3)]
    assert len(picks) == 3 and picks[0] == 0 and picks[-1] == want.n_chunks - 1 and picks == sorted(set(picks))


def test_runs_measure_share_agreement_and_kl(tool, tiny_mixed, tmp_path):
    ckpt, main, side = tiny_mixed
    # 128-value rows do not fit q2_K's 256-blocks: every projection falls back to q4_0
    assert tool.effective_types(side) == {"gate": "q4_0", "up": "q4_0", "down": "q4_0"}
    seqs = [np.random.default_rng(s).integers(0, 300, 24).astype(np.int32) for s in range(2)]
    refs = [str(tmp_path / f"ref{i}.npy") for i in range(2)]
    nones = [None, None]
    kw0 = tool.engine_kwargs(side, 0.0, 24, 1)
    ref = tool.run_task(tool.Task("ref", str(main), kw0, seqs, nones, 0, 23, save=refs))
    assert ref["stats"]["lo_pairs"] == 0
    off = tool.summarize(tool.run_task(tool.Task("off", str(main), {"n_ctx": 24}, seqs, nones, 0, 23, refs)), None)
    assert off["exact"] and off["kl_mean"] == 0.0 and off["top1_agreement"] == 1.0
    expected = tool.expected_shares(ckpt, seqs, THRESHOLDS)
    shares = []
    for thr in THRESHOLDS:
        kw = tool.engine_kwargs(side, thr, 24, 1)
        s = tool.summarize(tool.run_task(tool.Task(f"{thr}", str(main), kw, seqs, nones, 0, 23, refs)), None)
        shares.append(s["lo_share_of_pairs"])
        assert s["kl_mean"] > 0.0 and not s["exact"]
        assert s["lo_share_of_pairs"] == pytest.approx(expected[thr], abs=0.03)  # transformers' own router
    # top-2, weights normalised: the smaller weight is below 0.5, the larger not
    assert shares[1:] == [0.5, 1.0]
