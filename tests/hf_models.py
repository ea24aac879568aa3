"""Tiny random MoE checkpoints built with transformers (never downloaded).

Each architecture gets the settings its real models ship with, because those
are the settings llama.cpp implements: Qwen3-MoE normalises its top-k
weights, OLMoE has as many KV heads as heads, DeepSeek-V3 uses q_lora and
sigmoid scoring. With them, upstream llama.cpp matches transformers to ~4e-4.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-Experts models route every token to a few experts.",
    "An expert cache keeps the experts that tokens use often in fast memory.",
    "def add(a, b):\n    return a + b\n",
    "1 2 3 4 5 6 7 8 9 10 100 1000",
    "Paris is the capital of France. Berlin is the capital of Germany.",
]

COMMON: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "initializer_range": 0.08,
}


def _mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        **COMMON,
        num_key_value_heads=2,
        intermediate_size=192,
        num_local_experts=8,
        num_experts_per_tok=2,
        rope_theta=10000.0,
    )


def _qwen2_moe() -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **COMMON,
        num_key_value_heads=2,
        intermediate_size=192,
        moe_intermediate_size=96,
        shared_expert_intermediate_size=160,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=False,
        rope_theta=10000.0,
    )


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **COMMON,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=192,
        moe_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        rope_theta=10000.0,
    )


def _olmoe() -> Any:
    from transformers import OlmoeConfig

    return OlmoeConfig(
        **COMMON,
        num_key_value_heads=4,
        intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        rope_theta=10000.0,
    )


BUILDERS: dict[str, Callable[[], Any]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
}


def build_tokenizer(out_dir: Path, vocab_size: int = 384) -> Any:
    """A byte-level BPE trained on a few sentences, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_checkpoint(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Saves a random `arch` model (float32 safetensors) and its tokenizer in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = BUILDERS[arch]()
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "pymoe_test.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return out_dir


def reference_logits(model_dir: Path, tokens: list[int]) -> Any:
    """float32 logits [n_tokens, n_vocab] from transformers for `tokens`, used as given."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens], dtype=torch.long))
    return out.logits[0].float().numpy()
