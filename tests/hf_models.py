"""Tiny random MoE checkpoints built with transformers (never downloaded).

Each architecture gets the settings its real models ship with, because those
are the settings llama.cpp implements: Qwen3-MoE normalises its top-k
weights, OLMoE has as many KV heads as heads, DeepSeek-V2/V3 use q_lora,
DeepSeek-V3 sigmoid scoring with a (here random) correction bias, gpt-oss a
YaRN range rounded as ggml rounds it. With them and an f32 KV cache, upstream
llama.cpp matches transformers to ~1e-6 (DeepSeek ~2e-5).
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


def _deepseek_v2() -> Any:
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        **COMMON,
        num_key_value_heads=4,
        intermediate_size=192,
        moe_intermediate_size=96,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        q_lora_rank=96,  # without it llama.cpp takes only 26/27-layer models for "lite" ones
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        rope_theta=10000.0,
    )


def _deepseek_v3() -> Any:
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **COMMON,
        num_key_value_heads=4,
        intermediate_size=192,
        moe_intermediate_size=96,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        rope_theta=10000.0,
    )


def _gpt_oss() -> Any:
    from transformers import GptOssConfig

    return GptOssConfig(
        **{**COMMON, "max_position_embeddings": 4096 * 32},
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=96,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=16,  # shorter than the test's 48 tokens: the sliding layers really slide
        layer_types=["sliding_attention", "full_attention"] * 2,
        # real gpt-oss ships "truncate": false; ggml always rounds YaRN's correction
        # range (as truncate=true does), which alone costs ~5e-3 relative on this model
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": True,
        },
    )


BUILDERS: dict[str, Callable[[], Any]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
}

# What config.json must say beyond what transformers writes, as real checkpoints
# of the architecture ship it (transformers 5 omits DeepSeek-V3's scoring_func;
# without it a GGUF gets no gating function and llama.cpp falls back to softmax).
CONFIG_EXTRAS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"},
}

# Dimensions that are multiples of 256, the block length of the k-quants, so
# that every expert tensor really gets Q4_K / Q2_K instead of a fallback type.
WIDE: dict[str, int] = {
    "hidden_size": 256,
    "intermediate_size": 256,
    "moe_intermediate_size": 256,
    "shared_expert_intermediate_size": 256,
}


def build_tokenizer(
    out_dir: Path, vocab_size: int = 384, split_regexes: tuple[str, ...] = (), special_tokens: tuple[str, ...] = ()
) -> Any:
    """A byte-level BPE trained on a few sentences, saved in HF format. With
    `split_regexes`, the text is split by those (isolated) before the byte-level
    step, as Llama-3, Qwen2, DeepSeek-V3 and gpt-oss tokenizers do; without,
    by the ByteLevel step's own GPT-2 regex. `special_tokens` are added to
    <|endoftext|> (e.g. chat template markers)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split_regexes:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split_regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_checkpoint(
    arch: str,
    out_dir: Path,
    seed: int = 0,
    *,
    wide: bool = False,
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
    max_shard_size: str | None = None,
    special_tokens: tuple[str, ...] = (),
) -> Path:
    """Saves a random `arch` model (safetensors in `dtype`) and its tokenizer in `out_dir`.

    `wide`: hidden and expert sizes of 256 (see WIDE) instead of 128/96;
    `overrides`: config values to set on top; `max_shard_size` (e.g. "200KB"):
    save in shards with an index, as large hub checkpoints are; `special_tokens`:
    see build_tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, special_tokens=special_tokens)
    config = BUILDERS[arch]()
    if wide:
        for key, value in WIDE.items():
            if hasattr(config, key):
                setattr(config, key, value)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros at init: make the routing bias matter
                buf.copy_(torch.rand_like(buf) * 0.2)
    model.eval()
    shard = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(getattr(torch, dtype)).save_pretrained(out_dir, safe_serialization=True, **shard)
    extras = CONFIG_EXTRAS.get(arch)
    if extras:
        cfg_path = out_dir / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **extras}, indent=2))
    (out_dir / "pymoe_test.json").write_text(json.dumps({"arch": arch, "seed": seed, "wide": wide, "dtype": dtype}))
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
