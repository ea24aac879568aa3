"""Hostile inputs end in a clean Python exception, never a crash or a hang:
a weight type the CPU cannot multiply, and a bounded fuzz run over mutated
and truncated GGUF files and sidecars (tools/fuzz_gguf.py; the long runs and
the sanitizer runs are in docs/fuzzing.md). One-key metadata lies and weight
types are in test_validate.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_tool
from wheel_smoke import write_tiny_moe

from pymoe import Model, _core

FUZZ = ROOT / "tools" / "fuzz_gguf.py"


def test_a_weight_type_without_a_cpu_matmul_is_a_clean_error(tmp_path):
    path = tmp_path / "f64.gguf"
    write_tiny_moe(path, attn_dtype=np.float64)  # valid GGUF, F64 attention weights: used to SIGSEGV
    with pytest.raises(RuntimeError, match="is f64, which the CPU backend has no matrix multiplication for"):
        Model(path, n_ctx=64)
    ok = tmp_path / "f32.gguf"
    write_tiny_moe(ok)
    with Model(ok, n_ctx=64) as m:
        assert np.isfinite(m.logits([1, 2, 3])).all()


def test_a_vocabulary_its_tokenizer_cannot_use_is_a_clean_error(tmp_path):
    """An SPM tokenizer over a byte-level BPE vocabulary (no <0xNN> tokens):
    llama.cpp's byte fallback throws std::out_of_range, which reached Python
    as an IndexError with a traceback (found by the fuzzer)."""
    from gguf_edit import VT, rewrite_gguf

    seed = tmp_path / "seed.gguf"
    write_tiny_moe(seed)
    path = rewrite_gguf(seed, tmp_path / "spm.gguf", kv={"tokenizer.ggml.model": ("llama", VT.STRING)})
    with Model(path, n_ctx=64) as m, pytest.raises(RuntimeError, match="vocabulary cannot tokenize this text"):
        m.generate("Hello world", max_tokens=2, temperature=0)


@pytest.mark.parametrize("kind", ["scalar", "array", "string", "drop-key", "retype", "dup-token", "tensor-type",
                                  "tensor-dim", "tensor-data", "tensor-drop", "tensor-rename"])  # fmt: skip
def test_structural_mutations_get_past_ggmls_parser(kind, tmp_path):
    """The metadata and tensor mutations re-serialise a valid GGUF (offsets,
    sizes, alignment), so that they reach llama.cpp instead of ggml's parser."""
    import random

    fuzz = load_tool("fuzz_gguf")
    seed = tmp_path / "seed.gguf"
    write_tiny_moe(seed)
    data = seed.read_bytes()
    parsed = fuzz.parse(data)
    assert parsed.encode() == data  # the writer's layout, byte for byte
    rng = random.Random(3)
    parseable = 0
    for i in range(20):
        mutant, got, how = fuzz.mutate(data, parsed, [], rng, [kind])
        assert got == kind and mutant != data, how
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(mutant)
        try:
            _core.read_gguf(str(path), 0)
            parseable += 1
        except RuntimeError:
            pass
    assert parseable >= 10, f"{kind}: only {parseable} of 20 mutants parse"  # some are meant for the parser


def test_replay_takes_a_relative_path_and_no_repack(tmp_path):
    seed = tmp_path / "seed.gguf"
    write_tiny_moe(seed)
    proc = subprocess.run(
        [sys.executable, str(FUZZ), "--seed-model", "seed.gguf", "--replay", "seed.gguf", "--no-repack"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("loaded"), proc.stdout + proc.stderr


@pytest.mark.parametrize("target", ["model", "sidecar"])
def test_fuzzed_files_fail_cleanly(target, tmp_path):
    seed = tmp_path / "seed.gguf"
    write_tiny_moe(seed)
    args = [
        sys.executable,
        str(FUZZ),
        "--seed-model",
        str(seed),
        "--cases",
        "60",
        "--minutes",
        "3",
        "--seed",
        "7",
        "--keep-dir",
        str(tmp_path / "findings"),
        "--json",
        str(tmp_path / "out.json"),
        "--timeout",
        "60",
    ]
    if target == "sidecar":
        from pymoe.convert import build_sidecar

        side = tmp_path / "seed.lo.gguf"
        build_sidecar(seed, side, lo_type="q8_0")
        args += ["--sidecar", str(side)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["findings"] == [], proc.stderr
    assert proc.returncode == 0 and summary["cases"] == 60
    assert summary["outcomes"].get("clean", 0) > 0  # the mutations do break things, and cleanly
