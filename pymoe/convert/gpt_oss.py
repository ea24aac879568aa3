"""gpt-oss (llama.cpp's `gpt-oss`): experts stored fused and transposed,
[n_expert, n_in, n_out], gate and up interleaved column by column, with
biases; attention sinks; alternating sliding-window layers."""

from __future__ import annotations

import logging
import re

import gguf
import numpy as np

from .base import EXPERT_PROJ, MoEConverter, TensorPlan, computed, per_expert, register
from .checkpoint import Checkpoint, CheckpointError, TensorRef

logger = logging.getLogger("pymoe.convert")


@register
class GptOssConverter(MoEConverter):
    hf_architectures = ("GptOssForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GPT_OSS
    expert_pattern = re.compile(r"(?!)")  # no per-expert tensors in this family
    fused_pattern = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$")

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        if any(n.endswith(("_blocks", "_scales")) for n in checkpoint.tensors):
            raise CheckpointError(
                f"'{checkpoint.label}' stores its experts in MXFP4 (*_blocks/*_scales); the converter reads "
                "BF16/F16/F32 checkpoints; hint: use a bf16 copy of the model (for example one saved by transformers)"
            )
        # llama.cpp makes every even layer a sliding-window one
        types = self.hparams.get("layer_types")
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.block_count)]
        if types and list(types) != expected:
            logger.warning("%s: layer_types %s differ from llama.cpp's fixed gpt-oss pattern", checkpoint.label, types)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_sliding_window(int(self.hparam("sliding_window")))
        w.add_expert_feed_forward_length(int(self.hparam("intermediate_size")))

    def fused_expert_plans(self, layer: int, proj: str, ref: TensorRef, hf_name: str) -> list[TensorPlan]:
        if len(ref.shape) != 3 or ref.shape[0] != self.n_expert:
            raise CheckpointError(f"'{hf_name}' has shape {ref.shape}; expected [{self.n_expert}, n_in, n_out]")
        n_expert, n_in, n_out = ref.shape
        if proj == "down_proj":
            transposed = per_expert(n_expert, lambda e: ref.load(e).T)
            return [
                TensorPlan(self.gguf_name(EXPERT_PROJ["down"], layer), (n_expert, n_out, n_in), transposed, hf_name)
            ]
        # columns 0, 2, 4 ... are the gate's outputs, 1, 3, 5 ... the up projection's
        gate = per_expert(n_expert, lambda e: ref.load((e, slice(None), slice(0, None, 2))).T)
        up = per_expert(n_expert, lambda e: ref.load((e, slice(None), slice(1, None, 2))).T)
        shape = (n_expert, n_out // 2, n_in)
        return [
            TensorPlan(self.gguf_name(EXPERT_PROJ["gate"], layer), shape, gate, hf_name),
            TensorPlan(self.gguf_name(EXPERT_PROJ["up"], layer), shape, up, hf_name),
        ]

    def plan_tensor(self, hf_name: str, ref: TensorRef) -> list[TensorPlan]:
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_bias$", hf_name)
        if m is None:
            return super().plan_tensor(hf_name, ref)
        bid = int(m.group(1))
        if m.group(2) == "down_proj":
            return [
                TensorPlan(self.gguf_name(EXPERT_PROJ["down"], bid, ".bias"), ref.shape, computed(ref.load), hf_name)
            ]
        n_expert, n_out = ref.shape

        def part(cols: slice):
            return computed(lambda: np.ascontiguousarray(ref.load()[:, cols]))

        return [
            TensorPlan(
                self.gguf_name(EXPERT_PROJ["gate"], bid, ".bias"),
                (n_expert, n_out // 2),
                part(slice(0, None, 2)),
                hf_name,
            ),
            TensorPlan(
                self.gguf_name(EXPERT_PROJ["up"], bid, ".bias"),
                (n_expert, n_out // 2),
                part(slice(1, None, 2)),
                hf_name,
            ),
        ]
