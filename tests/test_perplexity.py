"""Perplexity and the comparison of a run with a saved reference run (KL divergence, top-1 agreement,
perplexity ratio): the library (`Model.perplexity`) and `pymoe perplexity`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_pymoe

from pymoe import LogitsReference, Model
from pymoe.perplexity import BELOW, LP_RANGE, pick_chunks

TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 8


def log_softmax(rows):
    x = rows.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def chunk_rows(m, tokens, n_ctx, c):
    """float32 logits [n_ctx / 2, n_vocab] before the scored tokens of chunk c, and those tokens."""
    chunk = np.asarray(tokens[c * n_ctx : (c + 1) * n_ctx], dtype=np.int32)
    fed = chunk.copy()
    bos = m.tokenize("", add_bos=True)
    if bos:
        fed[0] = bos[0]
    return m.logits(fed)[n_ctx // 2 - 1 : n_ctx - 1], chunk[n_ctx // 2 :]


@pytest.fixture(scope="module")
def models(tiny):
    """The tiny random Mixtral at f32 and at q8_0: one vocabulary, slightly different logits."""
    with (
        Model(tiny.gguf("mixtral"), n_ctx=64, offload="off") as f32,
        Model(tiny.gguf("mixtral", "q8_0"), n_ctx=64, offload="off") as q8,
    ):
        yield f32, q8


def test_pick_chunks():
    assert pick_chunks(10, 0) == list(range(10)) and pick_chunks(3, 5) == [0, 1, 2]
    picks = pick_chunks(38, 4)
    assert picks == [0, 12, 25, 37]  # docs/quality.md's chunks
    picks = pick_chunks(10, 3)
    assert len(picks) == 3 and picks[0] == 0 and picks[-1] == 9 and picks == sorted(set(picks))


def test_reference_comparison_matches_an_exact_computation(models, tmp_path):
    f32, q8 = models
    tokens = f32.tokenize(TEXT, add_bos=False)
    n_ctx = 16
    ref_file = tmp_path / "ref.kld"
    base = f32.perplexity(tokens, n_ctx=n_ctx, save_reference=ref_file)
    assert base.comparison is None and base.chunks == list(range(len(tokens) // n_ctx))
    with pytest.raises(FileExistsError, match="--force"):
        f32.perplexity(tokens, n_ctx=n_ctx, save_reference=ref_file)
    ref = LogitsReference.open(ref_file)
    assert (ref.n_ctx, ref.first, ref.n_vocab, ref.chunks) == (n_ctx, n_ctx // 2, f32.n_vocab, base.chunks)
    # the same model: identical logits, KL exactly 0, the same perplexity
    same = f32.perplexity(reference=ref_file)
    c = same.comparison
    assert same.perplexity == base.perplexity and c.reference_perplexity == pytest.approx(base.perplexity, rel=1e-12)
    assert c.identical == 1.0 and c.kl_mean == 0.0 and c.kl_max == 0.0 and c.top1_agreement == 1.0
    assert c.ppl_ratio == 1.0 and c.ppl_ratio_stderr == 0.0
    # another quantisation of the model against it, and the same figures computed from the full logits
    res = q8.perplexity(reference=ref)
    c = res.comparison
    kl, agree, d = [], [], []
    for i in range(res.n_chunks):
        rows_f, targets = chunk_rows(f32, tokens, n_ctx, i)
        rows_q, _ = chunk_rows(q8, tokens, n_ctx, i)
        lf, lq = log_softmax(rows_f), log_softmax(rows_q)
        kl.append((np.exp(lf) * (lf - lq)).sum(axis=1))
        agree.append(rows_f.argmax(axis=1) == rows_q.argmax(axis=1))
        at = np.arange(len(targets))
        d.append(lf[at, targets] - lq[at, targets])
    kl, agree, d = np.concatenate(kl), np.concatenate(agree), np.concatenate(d)
    assert kl.mean() > 0.0 and c.identical == 0.0
    # the file keeps 16-bit log-probabilities: KL within a few parts per thousand
    assert c.kl_mean == pytest.approx(kl.mean(), rel=5e-3, abs=1e-7)
    assert c.kl_p99 == pytest.approx(np.quantile(kl, 0.99), rel=5e-3, abs=1e-7)
    assert c.kl_median == pytest.approx(np.median(kl), rel=5e-3, abs=1e-7)
    assert c.kl_stderr == pytest.approx(kl.std(ddof=1) / np.sqrt(len(kl)), rel=2e-2)
    assert c.top1_agreement == agree.mean()
    assert c.ppl_ratio == pytest.approx(np.exp(d.mean()), rel=1e-9)
    assert res.perplexity / c.reference_perplexity == pytest.approx(c.ppl_ratio, rel=1e-9)
    assert c.ppl_change_pct == pytest.approx(100 * (c.ppl_ratio - 1))


def test_quantised_log_probs(models, tmp_path):
    """The stored codes give each kept log-probability within half a step, and drop only what lies more than
    LP_RANGE below the row's largest."""
    f32, _ = models
    tokens = f32.tokenize(TEXT, add_bos=False)
    f32.perplexity(tokens, n_ctx=32, chunks=1, save_reference=tmp_path / "r.kld")
    ref = LogitsReference.open(tmp_path / "r.kld")
    rows, _ = chunk_rows(f32, tokens, 32, 0)
    exact = log_softmax(rows)
    lp, kept = ref.log_probs(slice(0, ref.n_rows))
    assert np.array_equal(kept, np.asarray(ref.arrays["codes"]) != BELOW)
    # kept: within a step (half a step of rounding, and the renormalisation over the kept tokens)
    step = np.asarray(ref.arrays["step"], dtype=np.float64)[:, None]
    assert np.all(np.abs(np.where(kept, lp - exact, 0.0)) <= step + 1e-6)
    # dropped: only log-probabilities more than LP_RANGE below the row's largest
    floor = exact.max(axis=1, keepdims=True) - LP_RANGE
    assert np.all(np.where(kept, exact >= floor - 1e-5, exact < floor + 1e-5))
    assert np.array_equal(np.asarray(ref.arrays["argmax"]), rows.argmax(axis=1))


def test_token_by_token_and_spread_chunks(models, tmp_path):
    f32, _ = models
    tokens = f32.tokenize(TEXT, add_bos=False)
    res = f32.perplexity(tokens, n_ctx=16, chunks=3, token_by_token=True)
    n_total = len(tokens) // 16
    assert res.chunks == pick_chunks(n_total, 3) and res.n_chunks == 3 and res.token_by_token
    nll = []
    for c in res.chunks:
        chunk = np.asarray(tokens[c * 16 : (c + 1) * 16])
        fed = chunk.tolist()
        bos = f32.tokenize("", add_bos=True)
        if bos:
            fed[0] = bos[0]
        f32.reset()
        rows = np.stack([f32.next_token_logits(fed[:i]) for i in range(1, 16)])[7:]
        lp = log_softmax(rows)
        nll.append(-lp[np.arange(8), chunk[8:]])
    assert res.nll == pytest.approx(np.concatenate(nll).mean(), rel=1e-12)
    # a comparison runs as its reference was made unless told otherwise
    ref_file = tmp_path / "ref.kld"
    f32.perplexity(tokens, n_ctx=16, chunks=3, token_by_token=True, save_reference=ref_file)
    same = f32.perplexity(reference=ref_file)
    assert same.token_by_token and same.comparison.identical == 1.0 and same.nll == res.nll
    assert not f32.perplexity(reference=ref_file, token_by_token=False).token_by_token


def test_errors(models, tiny, tmp_path, dense_gguf):
    f32, _ = models
    tokens = f32.tokenize(TEXT, add_bos=False)
    ref_file = tmp_path / "ref.kld"
    f32.perplexity(tokens, n_ctx=16, chunks=2, save_reference=ref_file)
    with pytest.raises(ValueError, match="own tokens"):
        f32.perplexity(tokens, reference=ref_file)
    with pytest.raises(ValueError, match="chunks of 16"):
        f32.perplexity(reference=ref_file, n_ctx=32)
    with Model(dense_gguf, n_ctx=32, offload="off") as other, pytest.raises(ValueError, match="share a tokenizer"):
        other.perplexity(reference=ref_file)
    not_ref = tmp_path / "text.kld"
    not_ref.write_text("hello")
    with pytest.raises(ValueError, match="not a pymoe logits reference"):
        f32.perplexity(reference=not_ref)
    damaged = tmp_path / "damaged.kld"
    body = b'{"version": 1, "n_ctx": 16}'
    damaged.write_bytes(b"PYMOEKLD" + len(body).to_bytes(4, "little") + body)
    with pytest.raises(ValueError, match="damaged header"):
        LogitsReference.open(damaged)
    cut = tmp_path / "cut.kld"
    cut.write_bytes(ref_file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        LogitsReference.open(cut)
    with pytest.raises(FileNotFoundError):
        f32.perplexity(reference=tmp_path / "none.kld")
    # a run that fails leaves no file behind
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        f32.perplexity([f32.n_vocab + 5] * 32, n_ctx=16, save_reference=tmp_path / "bad.kld")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.kld", "damaged.kld", "ref.kld", "text.kld"]


def test_cli(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ref = tmp_path / "ref.kld"
    f32, q8 = str(tiny.gguf("mixtral")), str(tiny.gguf("mixtral", "q8_0"))
    save = run_pymoe(
        "perplexity", f32, "-f", str(text), "--chunk", "16", "--chunks", "3", "--kl-divergence-base", str(ref)
    )
    assert save.returncode == 0, save.stderr
    assert "saved the reference (24 positions" in save.stdout and ref.is_file()
    again = run_pymoe("perplexity", f32, "-f", str(text), "--chunk", "16", "--kl-divergence-base", str(ref))
    assert again.returncode == 1 and "--force" in again.stderr
    proc = run_pymoe("perplexity", q8, "--kl-divergence-base", str(ref), "--kl-divergence", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n_chunks"] == 3 and res["n_ctx"] == 16 and res["n_tokens"] == 24
    c = res["comparison"]
    assert 0.0 < c["kl_mean"] < 1.0 and 0.0 <= c["top1_agreement"] <= 1.0 and c["ppl_ratio"] > 0
    counters = tmp_path / "stats.json"
    text_out = run_pymoe("perplexity", q8, "--kl-divergence-base", str(ref), "--kl-divergence", "--offload", "on",
                         "--expert-budget", "0.5", "--stats", "--stats-json", str(counters))  # fmt: skip
    assert "KL divergence mean" in text_out.stdout and "top-1 agreement" in text_out.stdout
    # --stats: the summary on stderr; --stats-json: the raw counters (no generation in a perplexity run)
    report = json.loads(counters.read_text())
    assert list(report) == ["offload"] and report["offload"]["hit_rate"] > 0
    assert f"hit rate     {report['offload']['hit_rate']:.1%} of " in text_out.stderr, text_out.stderr
    assert "speed" not in text_out.stderr
    for bad, why in (
        (["--kl-divergence"], "--kl-divergence-base"),
        (["--kl-divergence-base", str(ref), "--kl-divergence", "-f", str(text)], "drop -f"),
        (["--kl-divergence-base", str(ref), "--kl-divergence", "--chunk", "32"], "drop --chunk"),
        ([], "-f FILE"),
    ):
        proc = run_pymoe("perplexity", q8, *bad)
        assert proc.returncode == 1 and why in proc.stderr, (bad, proc.stderr)
