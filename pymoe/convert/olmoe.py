"""OLMoE (q/k norms over all heads)."""

from __future__ import annotations

import gguf

from .base import MoEConverter, register
from .checkpoint import Checkpoint, CheckpointError


@register
class OlmoeConverter(MoEConverter):
    hf_architectures = ("OlmoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.OLMOE

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        n_head, n_kv = int(self.hparam("num_attention_heads")), self.n_head_kv()
        if n_kv != n_head:
            # llama.cpp's olmoe normalises k over n_head * head_dim values
            raise CheckpointError(
                f"'{checkpoint.label}' has {n_kv} KV heads for {n_head} heads; llama.cpp's olmoe needs them equal"
            )
