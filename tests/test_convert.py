"""`pymoe convert` checked against independent implementations: for every
architecture, a random tiny checkpoint converted at f32 gives transformers'
logits; its tensors and metadata are those of llama.cpp's own converter; at
q8_0 and q4_K (with the q2_K sidecar) the error is measured and printed
(`pytest tests/test_convert.py -s`)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import run_pymoe
from hf_models import BUILDERS, build_checkpoint, reference_logits

from pymoe import Model, _core
from pymoe.convert import convert
from pymoe.sidecar import check_sidecar, is_expert_weight

ARCHS = sorted(BUILDERS)
N_TOKENS = 48


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def error_report(ours: np.ndarray, ref: np.ndarray) -> str:
    """Max relative error (the issue's measure), the median over tokens of each
    token's relative error, and top-1 agreement. On random tiny models the max
    is dominated by tokens whose expert choice flips under quantisation."""
    per_token = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
    top1 = float((ours.argmax(axis=1) == ref.argmax(axis=1)).mean())
    return f"max {relative_error(ours, ref):.2e}, median/token {np.median(per_token):.2e}, top-1 {top1:.0%}"


class Wide:
    """Wide (256) random checkpoints and their transformers logits, per session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = np.random.default_rng(1).integers(0, 384, N_TOKENS).tolist()
        self._ref: dict[str, np.ndarray] = {}

    def checkpoint(self, arch: str) -> Path:
        out = self.root / arch
        if not (out / "config.json").is_file():
            build_checkpoint(arch, out, wide=True)
        return out

    def reference(self, arch: str) -> np.ndarray:
        if arch not in self._ref:
            self._ref[arch] = reference_logits(self.checkpoint(arch), self.tokens)
        return self._ref[arch]

    def logits(self, path: Path) -> np.ndarray:
        with Model(path, cache_type="f32") as m:
            return m.logits(self.tokens)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Wide:
    return Wide(tmp_path_factory.mktemp("wide-moe"))


def swap_in_sidecar(main: Path, sidecar: Path, out: Path) -> None:
    """A GGUF like `main` whose expert weights are the sidecar's low-precision
    copies: llama.cpp runs it, which measures what the sidecar's experts cost."""
    r_main, r_side = gguf.GGUFReader(main), gguf.GGUFReader(sidecar)
    lo = {t.name: t for t in r_side.tensors}
    arch = r_main.get_field("general.architecture").contents()
    w = gguf.GGUFWriter(out, arch)
    for name, fld in r_main.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, fld.contents(), fld.types[0], sub)
    for t in r_main.tensors:
        src = lo.get(t.name, t)
        raw = src.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        w.add_tensor(t.name, src.data, raw_dtype=src.tensor_type if raw else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_conversion_matches_transformers(wide, tmp_path, arch):
    out = tmp_path / f"{arch}.gguf"
    proc = run_pymoe("convert", str(wide.checkpoint(arch)), "-o", str(out), "--outtype", "f32", "--expert-type", "f32")
    assert proc.returncode == 0, proc.stderr
    assert "fallback" not in proc.stdout
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == {gguf.GGMLQuantizationType.F32}
    check_sidecar(out, tmp_path / f"{arch}.lo.gguf")
    ours, ref = wide.logits(out), wide.reference(arch)
    err = relative_error(ours, ref)
    print(f"\n{arch} f32: max relative logit error {err:.2e}")
    # the issue asks <= 1e-3; measured 1e-6 (DeepSeek 2e-5): anything near 1e-3 is a bug
    assert err <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_quantised_conversion_and_sidecar(wide, tmp_path, arch):
    ckpt, ref = wide.checkpoint(arch), wide.reference(arch)
    q8 = tmp_path / "q8.gguf"
    convert(ckpt, q8, outtype="q8_0", expert_type="q8_0", lo_type=None)
    err_q8 = wide.logits(q8)

    main = tmp_path / "q4k.gguf"
    result = convert(ckpt, main)  # defaults: experts q4_K, the rest q8_0, sidecar q2_K
    assert result.sidecar == tmp_path / "q4k.lo.gguf" and not result.fallbacks
    experts = [t for t in result.tensors if is_expert_weight(t.name)]
    assert experts and all(t.type == "q4_K" and t.lo_type == "q2_K" for t in experts)
    others = [t for t in result.tensors if not is_expert_weight(t.name)]
    assert {t.type for t in others} == {"q8_0", "f32"}

    # both files load: the main one in llama.cpp, the sidecar through its binding check ...
    info = check_sidecar(main, result.sidecar)
    assert info.lo_type == "q2_K" and {t.name for t in info.tensors} == {t.name for t in experts}
    assert all(t.type == "q2_K" and t.main_type == "q4_K" for t in info.tensors)
    # ... and its experts run in llama.cpp in place of the q4_K ones
    lo_model = tmp_path / "lo-experts.gguf"
    swap_in_sidecar(main, result.sidecar, lo_model)
    hi, lo = wide.logits(main), wide.logits(lo_model)
    print(
        f"\n{arch} q8_0:             {error_report(err_q8, ref)}"
        f"\n{arch} q4_K experts:     {error_report(hi, ref)}"
        f"\n{arch} q2_K (sidecar):   {error_report(lo, ref)}"
    )
    for logits in (err_q8, hi, lo):
        assert np.isfinite(logits).all()
    # the low-precision copy is a different, coarser quantisation of the same experts
    assert relative_error(lo, hi) > 0 and relative_error(hi, ref) < 1.5 and relative_error(lo, ref) < 2.5


@pytest.mark.parametrize("arch", ARCHS)
def test_same_tensors_and_metadata_as_llama_cpp_converter(tiny, tmp_path, arch):
    """llama.cpp's own convert_hf_to_gguf.py on the same checkpoint writes the
    same tensors, bit for bit, and the same metadata, save names and our keys."""
    ours_path = tmp_path / "ours.gguf"
    convert(tiny.checkpoint(arch), ours_path, outtype="f32", expert_type="f32", lo_type=None)
    ours, theirs = gguf.GGUFReader(ours_path), gguf.GGUFReader(tiny.gguf(arch))
    theirs_t = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(theirs_t)
    for t in ours.tensors:
        u = theirs_t[t.name]
        assert t.tensor_type == u.tensor_type and t.shape.tolist() == u.shape.tolist(), t.name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(u.data), err_msg=t.name)
    differ = {"general.name", "general.size_label"}  # labels derived from the folder name, not the model

    def fields(r: gguf.GGUFReader) -> dict[str, object]:
        return {
            k: f.contents()
            for k, f in r.fields.items()
            if not k.startswith(("GGUF.", "pymoe.")) and k not in differ and not k.endswith(".expert_gating_func")
        }

    assert fields(ours) == fields(theirs)


def test_q8_0_bytes_equal_llama_cpp_converter(tiny, tmp_path):
    ours_path = tmp_path / "ours.gguf"
    convert(tiny.checkpoint("qwen2_moe"), ours_path, outtype="q8_0", expert_type="q8_0", lo_type=None)
    theirs = {t.name: t for t in gguf.GGUFReader(tiny.gguf("qwen2_moe", "q8_0")).tensors}
    for t in gguf.GGUFReader(ours_path).tensors:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data), err_msg=t.name)


def _fuse_experts(src: Path, dst: Path, n_expert: int) -> None:
    """Rewrites a per-expert checkpoint with its experts fused the transformers 5
    way: mlp.experts.gate_up_proj [n_expert, 2 * n_ff, n_embd] (gate rows, then
    up rows) and mlp.experts.down_proj [n_expert, n_embd, n_ff]."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    tensors = load_file(src / "model.safetensors")
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    layers = sorted({int(k.split(".")[2]) for k in tensors if ".mlp.experts." in k})
    for layer in layers:
        pre = f"model.layers.{layer}.mlp.experts"
        experts = [
            {p: tensors[f"{pre}.{e}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
            for e in range(n_expert)
        ]
        out[f"{pre}.gate_up_proj"] = np.stack([np.concatenate([x["gate_proj"], x["up_proj"]]) for x in experts])
        out[f"{pre}.down_proj"] = np.stack([x["down_proj"] for x in experts])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


def test_fused_experts_convert_like_per_expert_ones(wide, tmp_path):
    ckpt = wide.checkpoint("qwen3_moe")
    fused = tmp_path / "fused"
    _fuse_experts(ckpt, fused, n_expert=8)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert(ckpt, a, outtype="f32", expert_type="q4_K", lo_type=None)
    convert(fused, b, outtype="f32", expert_type="q4_K", lo_type=None)
    ta = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(b).tensors}
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sharded_half_precision_checkpoint(tmp_path, dtype):
    ckpt = build_checkpoint("mixtral", tmp_path / "ck", dtype=dtype, max_shard_size="300KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    out = tmp_path / "m.gguf"
    convert(ckpt, out, outtype="f32", expert_type="f32", lo_type=None)
    tokens = np.random.default_rng(2).integers(0, 384, N_TOKENS).tolist()
    with Model(out, cache_type="f32") as m:
        ours = m.logits(tokens)
    # transformers runs the half-precision weights upcast to float32: the same values we store
    assert relative_error(ours, reference_logits(ckpt, tokens)) <= 1e-4


def test_deepseek_v3_without_scoring_func_still_scores_with_a_sigmoid(tmp_path):
    ckpt = build_checkpoint("deepseek_v3", tmp_path / "ck")
    config = json.loads((ckpt / "config.json").read_text())
    del config["scoring_func"]  # as transformers 5 writes it
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "d.gguf"
    convert(ckpt, out, outtype="f32", expert_type="f32", lo_type=None)
    func = gguf.GGUFReader(out).get_field("deepseek2.expert_gating_func").contents()
    assert func == gguf.ExpertGatingFuncType.SIGMOID
    tokens = np.random.default_rng(3).integers(0, 384, N_TOKENS).tolist()
    with Model(out, cache_type="f32") as m:
        assert relative_error(m.logits(tokens), reference_logits(ckpt, tokens)) <= 1e-4


def test_deepseek_yarn_rope_with_mscale(tmp_path):
    """Real DeepSeek-V3 checkpoints use YaRN with mscale_all_dim (which also scales attention)."""
    rope = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    ckpt = build_checkpoint("deepseek_v3", tmp_path / "ck", overrides={"rope_parameters": rope})
    out = tmp_path / "d.gguf"
    convert(ckpt, out, outtype="f32", expert_type="f32", lo_type=None)
    tokens = np.random.default_rng(4).integers(0, 384, N_TOKENS).tolist()
    with Model(out, cache_type="f32") as m:
        assert relative_error(m.logits(tokens), reference_logits(ckpt, tokens)) <= 1e-4


@pytest.mark.parametrize("qtype", _core.quant_types())
def test_every_type_ggml_quantises_to(wide, tmp_path, qtype):
    """Experts and sidecar in each type: llama.cpp loads and runs the result."""
    out = tmp_path / "m.gguf"
    result = convert(wide.checkpoint("olmoe"), out, outtype="f16", expert_type=qtype, lo_type=qtype)
    assert {t.type for t in result.tensors if is_expert_weight(t.name)} == {qtype}
    assert {t.type for t in check_sidecar(out, result.sidecar).tensors} == {qtype}
    assert np.isfinite(wide.logits(out)).all()


def test_experts_are_read_one_at_a_time(wide):
    """The plan's loaders yield one expert matrix per block: memory stays near one expert."""
    from pymoe.convert import base
    from pymoe.convert.checkpoint import Checkpoint

    ckpt = Checkpoint(wide.checkpoint("olmoe"))
    plans = base.converter_class(ckpt.config, "olmoe")(ckpt).plan()
    expert = next(p for p in plans if p.name == "blk.1.ffn_up_exps.weight")
    blocks = list(expert.load())
    assert len(blocks) == 8 and all(b.shape == expert.shape[1:] for b in blocks)


def test_sidecar_bytes_are_ggml_quantisations_of_the_experts(wide, tmp_path):
    """Sidecar made during conversion: each expert's q2_K bytes are ggml's
    quantisation of the checkpoint's float32 expert (not of the q4_K copy)."""
    from safetensors.numpy import load_file

    main = tmp_path / "m.gguf"
    result = convert(wide.checkpoint("qwen2_moe"), main)
    side = {t.name: t for t in gguf.GGUFReader(result.sidecar).tensors}
    weights = load_file(wide.checkpoint("qwen2_moe") / "model.safetensors")
    t = side["blk.2.ffn_down_exps.weight"]
    raw = np.asarray(t.data).reshape(8, -1)
    for e in (0, 5):
        expected = _core.quantize(weights[f"model.layers.2.mlp.experts.{e}.down_proj.weight"], "q2_K")
        np.testing.assert_array_equal(raw[e], expected.reshape(-1))


def test_safetensors_truncation_is_named(tmp_path, wide):
    ckpt = tmp_path / "ck"
    shutil.copytree(wide.checkpoint("olmoe"), ckpt)
    st = ckpt / "model.safetensors"
    data = st.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    st.write_bytes(data[: 8 + n + 100])
    with pytest.raises(ValueError, match="truncated"):
        convert(ckpt, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
