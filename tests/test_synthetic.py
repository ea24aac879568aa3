"""tools/make_synthetic_moe.py: the benchmark models load in llama.cpp with
the preset's exact shapes and types."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
from conftest import load_tool

from pymoe import Model, _core, summarize

synth = load_tool("make_synthetic_moe")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The two tiny presets, written once."""
    root = tmp_path_factory.mktemp("synthetic")
    return {name: synth.write_model(name, root / f"{name}.gguf", seed=1) for name in ("tiny", "qwen3-tiny")}


@pytest.mark.parametrize("name", ["tiny", "qwen3-tiny"])
def test_file_has_the_preset_shapes_types_and_bytes(written, name):
    path = written[name]
    preset = synth.PRESETS[name]
    s = summarize(path)
    assert s.architecture == preset.arch
    assert (s.n_layer, s.n_expert, s.n_expert_used) == (preset.n_layer, preset.n_expert, preset.n_expert_used)
    got = {t.name: (t.shape, t.type, t.nbytes) for t in s.tensors}
    want = {t.name: (t.shape, t.type, t.nbytes()) for t in synth.tensor_specs(preset)}
    assert got == want
    sizes = synth.sizes(preset)
    assert s.expert_bytes == sizes.expert_bytes and s.other_bytes == sizes.other_bytes
    row = _core.row_size(preset.expert_type, preset.n_embd)
    down_row = _core.row_size(preset.expert_type, preset.n_ff_exp)
    assert sizes.bytes_per_expert == s.bytes_per_expert == 2 * preset.n_ff_exp * row + preset.n_embd * down_row
    assert path.stat().st_size >= sizes.total


@pytest.mark.parametrize("name", ["tiny", "qwen3-tiny"])
def test_file_runs_in_llama_cpp_with_and_without_offload(written, name):
    path = written[name]
    tokens = [1, *range(300, 340)]
    with Model(path, n_ctx=128, offload="off") as m:
        assert m.n_vocab == synth.PRESETS[name].n_vocab
        assert m.tokenize("hello world")  # the generated vocabulary tokenises text
        ref = m.logits(tokens)
    assert np.isfinite(ref).all() and ref.std() > 0
    with Model(path, n_ctx=128, offload="on", expert_budget=0.25, offload_tier="disk") as m:
        np.testing.assert_array_equal(m.logits(tokens), ref)
        assert m.offload_stats()["loads"] > 0


def test_random_weights_route_to_every_expert(written):
    path = written["tiny"]
    with Model(path, n_ctx=256, offload="on", expert_budget=1.0) as m:
        m.logits([1, *range(259, 459)])
        pairs = m.offload_stats(raw=True)["expert_pairs"]
    assert (pairs > 0).all()  # a random router spreads the tokens over all experts of every layer


def test_the_seed_fixes_the_bytes(tmp_path, written):
    again = synth.write_model("tiny", tmp_path / "again.gguf", seed=1)
    other = synth.write_model("tiny", tmp_path / "other.gguf", seed=2)

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(again) == digest(written["tiny"]) != digest(other)


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="--force"):
        synth.write_model("tiny", out)
    assert out.read_bytes() == b"keep" and list(tmp_path.iterdir()) == [out]  # no temporary file left
    synth.write_model("tiny", out, force=True)
    assert summarize(out).n_expert == 8


def test_real_presets_dry_run(capsys):
    assert synth.main(["mixtral-8x7b", "--dry-run"]) == 0
    assert "would write" in capsys.readouterr().out
    mixtral = synth.PRESETS["mixtral-8x7b"]
    specs = {t.name: t for t in synth.tensor_specs(mixtral)}
    assert specs["blk.31.ffn_gate_exps.weight"].shape == (4096, 14336, 8)
    assert specs["blk.0.ffn_down_exps.weight"].shape == (14336, 4096, 8)
    assert specs["blk.0.attn_k.weight"].shape == (4096, 1024)
    assert synth.sizes(mixtral).bytes_per_expert == 3 * 14336 * 4096 // 256 * 144  # q4_K: 144 bytes per 256 values
    qwen = synth.PRESETS["qwen3-30b-a3b"]
    specs = {t.name: t for t in synth.tensor_specs(qwen)}
    assert specs["blk.47.ffn_up_exps.weight"].shape == (2048, 768, 128)
    assert specs["blk.0.attn_q.weight"].shape == (2048, 4096)  # 32 heads x head_dim 128, wider than hidden
    assert specs["blk.0.attn_q_norm.weight"].shape == (128,)
    assert specs["token_embd.weight"].shape == (2048, 151936)
    assert 17e9 < synth.sizes(qwen).total < 19e9 and 26e9 < synth.sizes(mixtral).total < 28e9


def test_rows_must_fit_the_quant_blocks():
    with pytest.raises(ValueError, match="q4_K blocks of 256"):
        synth.check_types(replace(synth.PRESETS["tiny"], n_ff_exp=96, expert_type="q4_K"))
    with pytest.raises(ValueError, match="unknown preset"):
        synth.resolve("mixtral-9x9b")
