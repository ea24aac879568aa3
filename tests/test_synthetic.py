"""tools/make_synthetic_moe.py: the benchmark models load in llama.cpp with
the preset's exact shapes and types."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
from conftest import load_tool

from pymoe import Model, _core, summarize
from pymoe.sidecar import check_sidecar

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
    # and across versions of the tool: the figures in docs/benchmarks.md were measured on files it wrote
    assert digest(again) == "a10b39e15321152ccb921da14ee87db512c31698440abc731ef1d1b367b9b174"
    assert digest(written["qwen3-tiny"]) == "dfa0bd8ca5d4742e0487276460924825f2bf293d44aacd0670af6e34b60797b5"


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


def test_sidecar_is_bound_and_serves_pairs_low(tmp_path, written):
    """--sidecar: a sidecar pymoe.sidecar accepts, whose rows are the model's own rows at low
    precision, that leaves the model's bytes as they are, and that the engine serves pairs from."""
    main = synth.write_model("tiny", tmp_path / "m.gguf", seed=1, sidecar="q2_K")
    side = tmp_path / "m.lo.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.lo.gguf"]  # no temporary file left
    assert main.read_bytes() == written["tiny"].read_bytes()  # the same seed writes the same model
    info = check_sidecar(main, side)
    preset = synth.PRESETS["tiny"]
    assert info.lo_type == "q2_K" and len(info.tensors) == 3 * preset.n_layer
    assert {t.type for t in info.tensors} == {"q2_K"} and {t.main_type for t in info.tensors} == {"q8_0"}
    with open(main, "rb") as fm, open(side, "rb") as fs:
        for t in info.tensors:  # expert 5: dequantised, the low copy is the high one plus q2_K's error
            n = t.shape[0]
            fm.seek(t.main_offset + 5 * t.main_nbytes // t.n_expert)
            hi = _core.dequantize(np.frombuffer(fm.read(t.main_nbytes // t.n_expert), np.uint8), "q8_0", n)
            off, nbytes = t.expert_range(5)
            fs.seek(off)
            lo = _core.dequantize(np.frombuffer(fs.read(nbytes), np.uint8), "q2_K", n)
            assert np.corrcoef(hi.ravel(), lo.ravel())[0, 1] > 0.85
    tokens = [1, *range(300, 332)]
    with Model(main, n_ctx=128, offload="on", expert_budget=0.5, offload_tier="disk", sidecar=side) as m:
        assert m.offload_stats()["n_slots_lo"] > 0
        for i in range(1, len(tokens) + 1):  # one token per step, as decoding runs
            m.next_token_logits(tokens[:i])
        stats = m.offload_stats()
    assert stats["lo_pairs"] > 0 and stats["bytes_loaded_lo"] > 0


def test_sidecar_refusals_leave_nothing_behind(tmp_path):
    (tmp_path / "m.lo.gguf").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="--force"):
        synth.write_model("tiny", tmp_path / "m.gguf", sidecar="q3_K")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lo.gguf"]  # neither file, no temporary one
    with pytest.raises(ValueError, match="not a type ggml can quantise"):
        synth.write_model("tiny", tmp_path / "m.gguf", sidecar="q1_X")
    assert synth.main(["tiny", "--sidecar", "q3_K", "--dry-run"]) == 0
    synth.write_model("tiny", tmp_path / "m.gguf", sidecar="q3_K", force=True)
    assert check_sidecar(tmp_path / "m.gguf", tmp_path / "m.lo.gguf").lo_type == "q3_K"
