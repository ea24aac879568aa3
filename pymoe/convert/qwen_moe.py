"""Qwen2-MoE (shared expert with a sigmoid gate) and Qwen3-MoE (q/k norms)."""

from __future__ import annotations

import logging

import gguf

from .base import MoEConverter, register
from .checkpoint import Checkpoint, CheckpointError

logger = logging.getLogger("pymoe.convert")


class _QwenMoE(MoEConverter):
    normalises_top_k: bool  # what llama.cpp's graph for the architecture does, fixed in its code

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        dense = self.hparams.get("mlp_only_layers") or []
        if dense or int(self.hparams.get("decoder_sparse_step", 1)) != 1:
            raise CheckpointError(
                f"'{checkpoint.label}' mixes dense and MoE layers (mlp_only_layers={dense}, decoder_sparse_step="
                f"{self.hparams.get('decoder_sparse_step')}), which llama.cpp's {self.arch_name} does not run"
            )
        if bool(self.hparams.get("norm_topk_prob", False)) != self.normalises_top_k:
            logger.warning(
                "%s: config.json says norm_topk_prob=%s, but llama.cpp's %s always %s the top-k weights; "
                "the GGUF will not reproduce this checkpoint exactly",
                checkpoint.label,
                self.hparams.get("norm_topk_prob"),
                self.arch_name,
                "normalises" if self.normalises_top_k else "leaves unnormalised",
            )

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_expert_feed_forward_length(int(self.hparam("moe_intermediate_size")))


@register
class Qwen2MoeConverter(_QwenMoE):
    hf_architectures = ("Qwen2MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    normalises_top_k = False

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        if self.hparams.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(int(self.hparams["shared_expert_intermediate_size"]))


@register
class Qwen3MoeConverter(_QwenMoE):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    normalises_top_k = True
