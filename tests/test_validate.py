"""One byte of metadata, or one weight in a type nothing can read, is a clean
error before llama.cpp sees the file (native/pymoe-validate.cpp), in the
model constructor and in `pymoe info` alike; files from real converters pass.

Each hostile file runs in a subprocess. Without these checks, 21 of the 26
files made from the tiny llama model and all 5 made from converted
qwen3_moe/deepseek_v3/gpt_oss models aborted the process (a GGML_ASSERT in
llama.cpp's loader, vocabulary or graph, or in a CPU kernel at the first
decode); 4 got llama.cpp's own error, which did not name the cause (unequal
heads, partial rope, no vocabulary: a tensor shape; f64: no buffer type); the
file type loaded in a release build and is undefined behaviour that UBSan
reports; `pymoe info` exited 0 on all of them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import ROOT, TESTS
from gguf_edit import VT, rewrite_gguf
from wheel_smoke import write_tiny_moe

from pymoe import _core

Q = gguf.GGMLQuantizationType

# load it, generate, then `pymoe info` on it: one line each
PROBE = r"""
import sys
from pymoe import Model
from pymoe.cli import main
try:
    with Model(sys.argv[1], n_ctx=64) as m:
        m.generate("Hello world", max_tokens=2, temperature=0)
    print("LOADED")
except (ValueError, RuntimeError) as e:
    print("CLEAN", str(e).splitlines()[0])
print("INFO", main(["info", sys.argv[1]]))
"""


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("validate") / "seed.gguf"
    write_tiny_moe(path)  # llama architecture, 4 experts top-2, n_embd 64, 4 heads, gpt2 vocab
    return path


def probe(path: Path) -> tuple[str, int, str]:
    """(the load's outcome line, `pymoe info`'s exit code, its stderr)."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=120, cwd=TESTS
    )
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-800:]}"
    lines = proc.stdout.splitlines()
    info = next(line for line in lines if line.startswith("INFO"))
    return lines[0], int(info.split()[1]), proc.stderr


def f32(n: int) -> np.ndarray:
    return np.ones(n, np.float32)


CASES = {
    # the issue's files
    "expert_used_count > expert_count": ({"llama.expert_used_count": (5, VT.UINT32)}, {}, "cannot use more experts"),
    "expert_count 0": ({"llama.expert_count": (0, VT.UINT32)}, {}, "expert_count is 0"),
    "expert_count 1": ({"llama.expert_count": (1, VT.UINT32)}, {}, "expert_count is 1"),
    "expert_count 100000": ({"llama.expert_count": (100000, VT.UINT32)}, {}, "at most 1024 experts"),
    "expert_count 2^32-1": ({"llama.expert_count": (2**32 - 1, VT.UINT32)}, {}, "at most 1024 experts"),
    "expert_used_count 0": ({"llama.expert_used_count": (0, VT.UINT32)}, {}, "at least one"),
    "block_count 0": ({"llama.block_count": (0, VT.UINT32)}, {}, "1 to 512 layers"),
    "block_count 100000": ({"llama.block_count": (100000, VT.UINT32)}, {}, "1 to 512 layers"),
    "two identical tokens": (
        {"tokenizer.ggml.tokens": (["a", "a", *(chr(0x100 + i) for i in range(256))], VT.ARRAY)},
        {},
        "holds 'a' twice",
    ),
    "mxfp4 output_norm": ({}, {"output_norm.weight": (np.zeros(34, np.uint8), (64,), Q.MXFP4)}, "only as f32"),
    # the rest of what the loader, the graph and the CPU kernels assert on
    "per-layer expert_used_count above the experts": (
        {"llama.expert_used_count": ([2, 9], VT.ARRAY)},
        {},
        "cannot use more experts",
    ),
    "expert groups that do not divide the experts": (
        {"llama.expert_group_count": (3, VT.UINT32), "llama.expert_group_used_count": (1, VT.UINT32)},
        {},
        "groups must divide",
    ),
    "nextn layers beyond the layers": ({"llama.nextn_predict_layers": (3, VT.UINT32)}, {}, "more than the 2 layers"),
    "unknown rope scaling type": ({"llama.rope.scaling.type": ("cubic", VT.STRING)}, {}, "rope.scaling.type"),
    "negative norm epsilon": (
        {"llama.attention.layer_norm_rms_epsilon": (-1e-5, VT.FLOAT32)},
        {},
        "epsilon must be >= 0",
    ),
    "NaN norm epsilon": (
        {"llama.attention.layer_norm_rms_epsilon": (float("nan"), VT.FLOAT32)},
        {},
        "epsilon must be >= 0",
    ),
    "key and value heads of different sizes": (
        {"llama.attention.key_length": (16, VT.UINT32), "llama.attention.value_length": (8, VT.UINT32)},
        {},
        "head sizes differ",
    ),
    "partial rope in an architecture that rotates whole heads": (
        {"llama.rope.dimension_count": (8, VT.UINT32)},
        {},
        "rotates whole heads",
    ),
    "a vocabulary that is not there": ({"tokenizer.ggml.model": ("none", VT.STRING)}, {}, "no vocabulary"),
    "a BOS added to every prompt that the vocabulary lacks": (
        # a T5 (unigram) vocabulary has no default BOS; the file's own id is gone
        {
            "tokenizer.ggml.model": ("t5", VT.STRING),
            "tokenizer.ggml.add_bos_token": (True, VT.BOOL),
            "tokenizer.ggml.bos_token_id": None,
        },
        {},
        "no valid BOS token",
    ),
    # a release build loads it; UBSan: llama.cpp stores the value in a llama_ftype that cannot hold it
    "a file type no llama_ftype can hold": ({"general.file_type": (2**31, VT.UINT32)}, {}, "not a llama.cpp file type"),
    "an f16 norm": ({}, {"blk.0.attn_norm.weight": (np.ones(64, np.float16), (64,), Q.F16)}, "only as f32"),
    "an f16 bias": ({}, {"blk.0.attn_output.bias": (np.ones(64, np.float16), (64,), Q.F16)}, "only as f32"),
    "an i32 token embedding": (
        {},
        {"token_embd.weight": (np.zeros(258 * 64, np.int32), (64, 258), Q.I32)},
        "cannot look rows up",
    ),
    "an f64 matmul weight": (
        {},
        {"blk.0.attn_q.weight": (np.zeros(64 * 64, np.float64), (64, 64), Q.F64)},
        "no matrix multiplication",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_lying_file_is_one_clean_error_in_load_and_info(case, seed, tmp_path):
    kv, tensors, message = CASES[case]
    if "blk.0.attn_output.bias" in tensors:  # a tensor the seed lacks: add it
        path = tmp_path / "with-bias.gguf"
        write_tiny_moe(path)
        _add_tensor(path, "blk.0.attn_output.bias", f32(64))
        seed = path
    drop = tuple(k for k, v in kv.items() if v is None)
    kv = {k: v for k, v in kv.items() if v is not None}
    path = rewrite_gguf(seed, tmp_path / "case.gguf", kv=kv, drop=drop, tensors=tensors)
    assert_refused(path, message)


def assert_refused(path: Path, message: str) -> None:
    """Loading says `message` in one line, `pymoe info` says it and exits 1."""
    loaded, info_rc, info_err = probe(path)
    assert loaded.startswith("CLEAN") and message in loaded, loaded
    assert "hint:" not in loaded  # the hint is the message's second line
    assert info_rc == 1 and message in info_err, info_err
    assert message in " ".join(_core.gguf_problems(str(path))), "the shared check"


# architectures whose graph asserts what the llama seed's loader refuses or ignores,
# on tiny checkpoints converted by llama.cpp's own converter
ARCH_CASES = {
    "qwen3_moe, partial rope": ("qwen3_moe", {"qwen3moe.rope.dimension_count": (8, VT.UINT32)}, "whole heads"),
    "deepseek_v3, KV heads with latent attention": (
        "deepseek_v3",
        {"deepseek2.attention.head_count_kv": (2, VT.UINT32)},
        "head_count_kv must be 1",
    ),
    "deepseek_v3, rope as wide as the key": (
        "deepseek_v3",
        {"deepseek2.rope.dimension_count": (64, VT.UINT32), "deepseek2.attention.key_length_mla": (64, VT.UINT32)},
        "not less than the key head size",
    ),
    "deepseek_v3, unknown gating function": (
        "deepseek_v3",
        {"deepseek2.expert_gating_func": (7, VT.UINT32)},
        "expert_gating_func is 7",
    ),
    "gpt_oss, value heads of another size": (
        "gpt_oss",
        {"gpt-oss.attention.value_length": (8, VT.UINT32)},
        "must equal gpt-oss.rope.dimension_count",
    ),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_what_an_architectures_graph_asserts_is_a_clean_error(case, tiny, tmp_path):
    arch, kv, message = ARCH_CASES[case]
    assert_refused(rewrite_gguf(tiny.gguf(arch), tmp_path / "case.gguf", kv=kv), message)


def _add_tensor(path: Path, name: str, data: np.ndarray) -> None:
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(path.with_suffix(".tmp"), str(r.fields["general.architecture"].contents()))
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        w.add_key_value(
            key, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None
        )
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.with_suffix(".tmp").replace(path)


def test_the_seed_and_the_demo_models_have_no_problems(seed, demo_gguf, dense_gguf):
    for path in (seed, demo_gguf, dense_gguf):
        assert _core.gguf_problems(str(path)) == [], path
    loaded, info_rc, _ = probe(seed)
    assert loaded == "LOADED" and info_rc == 0


@pytest.mark.parametrize(
    "arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"]
)
def test_files_from_llama_cpps_converter_have_no_problems(arch, tiny):
    """No false refusal: what llama.cpp's own converter writes passes (f32 and q8_0)."""
    for outtype in ("f32", "q8_0"):
        assert _core.gguf_problems(str(tiny.gguf(arch, outtype))) == []


def test_the_head_assert_lists_match_the_pinned_source():
    """The architectures whose graph asserts whole-head rope / equal key and
    value heads, as native/pymoe-validate.cpp lists them, re-derived from the
    pinned llama.cpp: a new pin that changes them fails here."""
    src = ROOT / "third_party" / "llama.cpp" / "src"
    if not (src / "llama-model.cpp").is_file():
        pytest.skip("third_party/llama.cpp is not fetched")
    factory = dict(
        re.findall(r"case (LLM_ARCH_\w+):\s*return new (llama_model_\w+)\(", (src / "llama-model.cpp").read_text())
    )
    names = dict(re.findall(r'\{\s*(LLM_ARCH_\w+),\s*"([^"]+)"\s*\}', (src / "llama-arch.cpp").read_text()))
    asserts: dict[str, set[str]] = {}
    for f in (src / "models").glob("*.cpp"):
        text = f.read_text()
        found = {
            k
            for k, s in (("k", "n_embd_head == hparams.n_embd_head_k()"), ("rot", "n_embd_head == n_rot"))
            if s in text
        }
        for cls in set(re.findall(r"(llama_model_\w+)::", text)):
            asserts.setdefault(cls, set()).update(found)
    both = sorted(names[a] for a, c in factory.items() if asserts.get(c) == {"k", "rot"})
    k_only = sorted(names[a] for a, c in factory.items() if asserts.get(c) == {"k"})
    native = (ROOT / "native" / "pymoe-validate.cpp").read_text()

    def listed(var: str) -> list[str]:
        body = native.split(f"{var}[] = {{", 1)[1].split("};", 1)[0]
        return sorted(re.findall(r'"([^"]+)"', body))

    assert listed("archs_head_and_rot") == both
    assert listed("archs_head_only") == k_only

    # expert_gating_func: the classes whose load_arch_hparams reads it (a
    # subclass inherits its parent's), those that default 0 to a function, and
    # those that hand hparams.expert_gating_func to the MoE graph
    parent = dict(
        re.findall(r"struct (llama_model_\w+) : public (llama_model_\w+)", (src / "models" / "models.h").read_text())
    )
    loads: dict[str, str] = {}
    for f in (src / "models").glob("*.cpp"):
        text = f.read_text()
        for cls in re.findall(r"(llama_model_\w+)::load_arch_hparams", text):
            loads[cls] = text

    def loader(cls: str) -> str:
        while cls not in loads and cls in parent:
            cls = parent[cls]
        return loads.get(cls, "")

    reads = {a: loader(c) for a, c in factory.items() if "LLM_KV_EXPERT_GATING_FUNC" in loader(c)}
    gating = sorted(names[a] for a in reads)
    required = sorted(
        names[a]
        for a, text in reads.items()
        if "expert_gating_func == LLAMA_EXPERT_GATING_FUNC_TYPE_NONE" not in text
        and "(llama_expert_gating_func_type) hparams.expert_gating_func" in text
    )
    assert listed("archs_gating") == gating
    assert listed("archs_gating_required") == required
