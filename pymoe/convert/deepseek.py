"""DeepSeek-V2 and -V3 (llama.cpp's `deepseek2`): multi-head latent attention,
shared experts, leading dense layers, and for V3 sigmoid routing with a
per-expert correction bias and expert groups."""

from __future__ import annotations

import gguf
import numpy as np

from .base import MoEConverter, TensorPlan, computed, register, whole
from .checkpoint import CheckpointError, TensorRef

_GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}


@register
class DeepseekV2Converter(MoEConverter):
    hf_architectures = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.DEEPSEEK2

    def n_head_kv(self) -> int:
        return 1  # MLA runs as multi-query attention over the compressed KV

    def attention_lengths(self) -> tuple[int, int]:
        kv_lora = int(self.hparam("kv_lora_rank"))
        return kv_lora + int(self.hparam("qk_rope_head_dim")), kv_lora

    def scoring_func(self) -> str:
        # transformers' DeepseekV3 always scores with a sigmoid and V2 with a
        # softmax; real V3 checkpoints say so in config.json, transformers 5 does not write it
        default = "sigmoid" if "DeepseekV3ForCausalLM" in (self.hparams.get("architectures") or []) else "softmax"
        func = str(self.hparams.get("scoring_func") or default)
        if func not in _GATING:
            raise CheckpointError(f"'{self.ckpt.label}': scoring_func '{func}' is not one llama.cpp implements")
        return func

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        h = self.hparams
        w.add_vocab_size(int(self.hparam("vocab_size")))
        w.add_leading_dense_block_count(int(h.get("first_k_dense_replace") or 0))
        if h.get("q_lora_rank") is not None:
            w.add_q_lora_rank(int(h["q_lora_rank"]))
        w.add_kv_lora_rank(int(self.hparam("kv_lora_rank")))
        w.add_key_length_mla(int(self.hparam("qk_nope_head_dim")) + int(self.hparam("qk_rope_head_dim")))
        w.add_value_length_mla(int(self.hparam("v_head_dim")))
        w.add_expert_feed_forward_length(int(self.hparam("moe_intermediate_size")))
        w.add_expert_shared_count(int(h.get("n_shared_experts") or 0))
        w.add_expert_weights_scale(float(h.get("routed_scaling_factor") or 1.0))
        if h.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_expert_gating_func(_GATING[self.scoring_func()])
        if h.get("n_group") is not None:
            w.add_expert_group_count(int(h["n_group"]))
        if h.get("topk_group") is not None:
            w.add_expert_group_used_count(int(h["topk_group"]))
        w.add_rope_dimension_count(int(self.hparam("qk_rope_head_dim")))
        if (mscale_all_dim := self.rope_parameters.get("mscale_all_dim")) is not None:
            # llama.cpp's deepseek2 reads 0.1 * mscale_all_dim here (see its TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
            w.add_rope_scaling_yarn_log_mul(0.1 * float(mscale_all_dim))

    def plan_tensor(self, hf_name: str, ref: TensorRef) -> list[TensorPlan]:
        bid = int(hf_name.split(".")[2]) if hf_name.startswith("model.layers.") else None
        if hf_name.endswith("mlp.gate.e_score_correction_bias"):
            return [
                TensorPlan(
                    self.gguf_name(gguf.MODEL_TENSOR.FFN_EXP_PROBS_B, bid, ".bias"), ref.shape, whole(ref), hf_name
                )
            ]
        if hf_name.endswith("self_attn.kv_b_proj.weight"):
            return self.split_kv_b(bid, ref, hf_name)
        return super().plan_tensor(hf_name, ref)

    def split_kv_b(self, bid: int | None, ref: TensorRef, hf_name: str) -> list[TensorPlan]:
        """kv_b_proj [n_head * (nope + v), kv_lora] -> k_b [n_head, kv_lora, nope]
        (transposed, for the absorbed attention) and v_b [n_head, v, kv_lora]."""
        n_head = int(self.hparam("num_attention_heads"))
        nope, v = int(self.hparam("qk_nope_head_dim")), int(self.hparam("v_head_dim"))
        kv_lora = ref.shape[1]
        if ref.shape[0] != n_head * (nope + v):
            raise CheckpointError(f"'{hf_name}' has shape {ref.shape}; expected [{n_head * (nope + v)}, kv_lora_rank]")

        def k_b() -> np.ndarray:
            return ref.load().reshape(n_head, nope + v, kv_lora)[:, :nope, :].transpose(0, 2, 1)

        def v_b() -> np.ndarray:
            return ref.load().reshape(n_head, nope + v, kv_lora)[:, nope:, :]

        return [
            TensorPlan(
                self.gguf_name(gguf.MODEL_TENSOR.ATTN_K_B, bid), (n_head, kv_lora, nope), computed(k_b), hf_name
            ),
            TensorPlan(self.gguf_name(gguf.MODEL_TENSOR.ATTN_V_B, bid), (n_head, v, kv_lora), computed(v_b), hf_name),
        ]
