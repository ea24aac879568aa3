#!/usr/bin/env python3
"""A smoke test of an installed pymoe (a wheel in a fresh environment): no
compiler, no download, no model file needed. It writes a tiny random MoE GGUF
(llama architecture, 2 layers, 4 experts top-2, a byte-level vocabulary) with
the gguf package, then loads it, generates, offloads its experts with a
budget, and reads it back with `pymoe info`.

    python tools/wheel_smoke.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character map (the vocabulary of a byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_tiny_moe(
    path: Path, n_layer: int = 2, n_embd: int = 64, n_ff: int = 128, n_expert: int = 4, attn_dtype: type = np.float32
) -> None:
    """A tiny random llama-architecture MoE; `attn_dtype` is the attention weights' type (tests pass float64)."""
    rng = np.random.default_rng(0)
    byte = bytes_to_unicode()
    merged = byte[ord(" ")] + byte[ord("t")]  # one merge: the BPE needs at least one
    tokens = [byte[b] for b in range(256)] + [merged, "<|endoftext|>"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("pymoe wheel smoke test")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(n_embd // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 257 + [3])
    w.add_token_merges([f"{byte[ord(' ')]} {byte[ord('t')]}"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(257)

    def t(*shape: int) -> np.ndarray:  # numpy order: the reverse of ggml's
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    vocab = len(tokens)
    w.add_tensor("token_embd.weight", t(vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", t(vocab, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", t(n_embd, n_embd).astype(attn_dtype))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", t(n_expert, n_embd))
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", t(n_expert, n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up_exps.weight", t(n_expert, n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", t(n_expert, n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    import pymoe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-moe.gguf"
        write_tiny_moe(path)
        with pymoe.Model(path, n_ctx=128, offload="off") as m:
            ref = m.logits([72, 101, 108, 108, 111])
            text = m.generate("Hello", max_tokens=8, temperature=0)
        with pymoe.Model(path, n_ctx=128, offload="on", expert_budget=0.5) as m:
            np.testing.assert_array_equal(m.logits([72, 101, 108, 108, 111]), ref)
            assert m.generate("Hello", max_tokens=8, temperature=0) == text
            stats = m.offload_stats()
            assert stats["loads"] > 0
        info = subprocess.run(
            [sys.executable, "-m", "pymoe", "info", str(path)], capture_output=True, text=True, cwd=tmp, check=True
        ).stdout
        assert "4 per layer, 2 used per token" in info
    print(f"pymoe {pymoe.__version__} (llama.cpp {pymoe.llama_cpp_commit}): load, generate, offload, info ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
