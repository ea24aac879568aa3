"""`pymoe convert`: Hugging Face MoE checkpoints to GGUF, with a low-precision
copy of every expert in a sidecar GGUF for pymoe's mixed-precision cache.

    from pymoe.convert import convert, build_sidecar
    convert("Qwen/Qwen3-30B-A3B", "qwen3.gguf")  # qwen3.gguf (Q4_K experts, Q8_0 rest), qwen3.lo.gguf (Q2_K)
    build_sidecar("downloaded-Q4_K_M.gguf")      # downloaded-Q4_K_M.lo.gguf

One class per architecture family (mixtral, qwen_moe, olmoe, deepseek,
gpt_oss) on the common base in `base`; tokenizers in `vocab`; the streaming
GGUF writer in `writer`; the sidecar's binding in `pymoe.sidecar`.
"""

from __future__ import annotations

from . import deepseek, gpt_oss, mixtral, olmoe, qwen_moe  # noqa: F401 - they register their classes
from .base import MoEConverter, TensorPlan, supported_architectures
from .checkpoint import CheckpointError
from .pipeline import (
    DEFAULT_EXPERT_TYPE,
    DEFAULT_LO_TYPE,
    DEFAULT_OUTTYPE,
    ConvertResult,
    TensorRecord,
    build_sidecar,
    convert,
)
from .vocab import KNOWN_PRE_TOKENIZERS, TokenizerError
from .writer import ProgressEvent

__all__ = [
    "DEFAULT_EXPERT_TYPE",
    "DEFAULT_LO_TYPE",
    "DEFAULT_OUTTYPE",
    "KNOWN_PRE_TOKENIZERS",
    "CheckpointError",
    "ConvertResult",
    "MoEConverter",
    "ProgressEvent",
    "TensorPlan",
    "TensorRecord",
    "TokenizerError",
    "build_sidecar",
    "convert",
    "supported_architectures",
]
