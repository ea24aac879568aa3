"""Mixtral (llama.cpp's `llama` architecture with experts)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import ClassVar

import gguf
import numpy as np

from .base import MoEConverter, register


def interleave_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from Hugging Face's rotate-half order (per head:
    all first halves of the rotary pairs, then all second halves) to the
    interleaved pairs llama.cpp's `llama` rope rotates."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register
class MixtralConverter(MoEConverter):
    hf_architectures = ("MixtralForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    expert_pattern = re.compile(
        r"^model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3)\.weight$"
    )
    proj_names: ClassVar[dict[str, str]] = {"w1": "gate", "w3": "up", "w2": "down"}

    def head_dim(self) -> int:
        return int(self.hparams.get("head_dim") or self.hparam("hidden_size") // self.hparam("num_attention_heads"))

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_vocab_size(int(self.hparam("vocab_size")))
        w.add_rope_dimension_count(self.head_dim())

    def transform(self, hf_name: str) -> Callable[[np.ndarray], np.ndarray] | None:
        if hf_name.endswith("self_attn.q_proj.weight"):
            n_head = int(self.hparam("num_attention_heads"))
        elif hf_name.endswith("self_attn.k_proj.weight"):
            n_head = self.n_head_kv()
        else:
            return None
        return lambda a: interleave_rope_rows(a, n_head)
