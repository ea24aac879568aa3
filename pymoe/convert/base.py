"""The base of the per-architecture converters and their registry.

A converter turns a checkpoint into a list of `TensorPlan`s: the GGUF name
and shape of every output tensor and a loader that yields its float32 rows
in order, one block at a time (one expert of a merged expert tensor, or the
whole of a smaller tensor). Nothing is read while planning, so every name is
mapped and every expert accounted for before a byte is written; the writer
then loads, quantises and writes one block at a time, which keeps memory near
the size of one expert.

Subclasses (one per architecture family, in this package) name the
architecture, say where their experts are, and override `plan_tensor` and
`write_hparams` where the family differs from the common case. Names come
from the `gguf` package's constants and tensor-name map.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import gguf
import numpy as np

from .checkpoint import Checkpoint, CheckpointError, TensorRef

logger = logging.getLogger("pymoe.convert")

Loader = Callable[[], Iterator[np.ndarray]]

EXPERT_PROJ = {
    "gate": gguf.MODEL_TENSOR.FFN_GATE_EXP,
    "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
    "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP,
}

# checkpoint tensors that carry nothing llama.cpp uses
_SKIP = re.compile(r"(\.rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")

# config.json sizes the converters write, with the smallest value each may
# take; the largest is what a GGUF u32 and ggml's int32 dimensions hold
_SIZES: dict[str, int] = {
    "hidden_size": 1, "num_hidden_layers": 1, "n_layers": 1, "num_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "intermediate_size": 1, "moe_intermediate_size": 1,
    "shared_expert_intermediate_size": 0, "num_local_experts": 1, "num_experts": 1, "n_routed_experts": 1,
    "num_experts_per_tok": 1, "num_experts_per_token": 1, "moe_topk": 1, "vocab_size": 1,
    "max_position_embeddings": 1, "n_positions": 1, "head_dim": 1, "kv_lora_rank": 1, "q_lora_rank": 1,
    "qk_rope_head_dim": 1, "qk_nope_head_dim": 0, "v_head_dim": 1, "n_shared_experts": 0,
    "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "sliding_window": 0, "num_nextn_predict_layers": 0,
}  # fmt: skip
_MAX_SIZE = 2**31 - 1
MAX_LAYERS, MAX_EXPERTS = 512, 1024  # llama.cpp's LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS


@dataclass
class TensorPlan:
    """One tensor of the output file, before any data is read."""

    name: str  # GGUF name, e.g. blk.3.ffn_up_exps.weight
    shape: tuple[int, ...]  # NumPy order, outermost first (ggml's ne reversed)
    load: Loader  # yields float32 2-D blocks of rows [k, shape[-1]] that cover the tensor in order
    source: str  # the checkpoint tensor(s) it comes from, for messages

    @property
    def row_length(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def block(self) -> int | None:
        m = re.match(r"^blk\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None


def rows(a: np.ndarray) -> np.ndarray:
    """A float32 array as the 2-D row block the writer quantises."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.reshape(1, -1) if a.ndim <= 1 else a.reshape(-1, a.shape[-1])


def computed(get: Callable[[], np.ndarray]) -> Loader:
    """A loader for a tensor computed from checkpoint data in one piece."""

    def load() -> Iterator[np.ndarray]:
        yield rows(get())

    return load


_BLOCK_BYTES = 64 << 20  # float32 bytes per row block of a large 2-D tensor


def whole(ref: TensorRef, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Loader:
    """A loader for a whole checkpoint tensor, optionally transformed; a large
    untransformed matrix (an embedding) comes in row blocks of ~64 MB."""
    if transform is not None or len(ref.shape) != 2:
        return computed(ref.load if transform is None else lambda: transform(ref.load()))
    n_rows, n_cols = ref.shape
    step = max(1, _BLOCK_BYTES // max(1, 4 * n_cols))

    def load() -> Iterator[np.ndarray]:
        for r in range(0, n_rows, step):
            yield rows(ref.load(slice(r, r + step)))

    return load


def per_expert(n_expert: int, get: Callable[[int], np.ndarray]) -> Loader:
    """A loader that yields one expert's [n_out, n_in] matrix, `get(e)`, at a time."""

    def load() -> Iterator[np.ndarray]:
        for e in range(n_expert):
            yield rows(get(e))

    return load


def stacked(refs: list[TensorRef]) -> Loader:
    """Per-expert checkpoint tensors, one after the other."""
    return per_expert(len(refs), lambda e: refs[e].load())


def fused_part(ref: TensorRef, index: Callable[[int], Any]) -> Loader:
    """Experts sliced out of one fused 3-D checkpoint tensor: expert e is `ref[index(e)]`."""
    return per_expert(ref.shape[0], lambda e: ref.load(index(e)))


class MoEConverter:
    """Base class: the common Hugging Face decoder layout (`model.layers.N.…`)."""

    # registry keys: the `architectures` entries of config.json this class converts
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # per-expert checkpoint tensors, groups layer/expert/proj; proj_names maps proj -> gate/up/down
    expert_pattern: ClassVar[re.Pattern[str]] = re.compile(
        r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
    )
    proj_names: ClassVar[dict[str, str]] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    # experts already stacked as 3-D tensors [n_expert, n_out, n_in] (transformers 5 layout);
    # gate_up_proj holds gate and up concatenated along n_out
    fused_pattern: ClassVar[re.Pattern[str]] = re.compile(
        r"^model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts\."
        r"(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)(?:\.weight)?$"
    )

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.ckpt = checkpoint
        config = checkpoint.config
        # multimodal wrappers keep the language model's settings in text_config
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        self.hparams: dict[str, Any] = {**config, **text}
        self.arch_name: str = gguf.MODEL_ARCH_NAMES[self.gguf_arch]
        self.check_config()
        self.block_count = int(self.hparam("num_hidden_layers", "n_layers", "num_layers"))
        self.n_expert = int(self.hparam("num_local_experts", "num_experts", "n_routed_experts"))
        n_used = int(self.hparam("num_experts_per_tok", "num_experts_per_token", "moe_topk"))
        if self.block_count > MAX_LAYERS or self.n_expert > MAX_EXPERTS:
            raise self.config_error(
                f"says {self.block_count} layers and {self.n_expert} experts; llama.cpp runs at most "
                f"{MAX_LAYERS} layers of at most {MAX_EXPERTS} experts"
            )
        if n_used > self.n_expert:
            raise self.config_error(
                f"says each token uses {n_used} experts (num_experts_per_tok) of {self.n_expert}; it cannot use more "
                "than there are"
            )
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)
        self.skipped: list[str] = []

    # ------------------------------------------------------------------ settings

    def config_error(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"config.json of '{self.ckpt.label}' {what}; hint: config.json does not describe this checkpoint "
            "(use the one that came with the weights)"
        )

    def check_config(self) -> None:
        """Sizes are whole numbers in range and epsilons are not negative,
        before anything is derived from them (a GGUF stores them as u32)."""
        for key, smallest in _SIZES.items():
            v = self.hparams.get(key)
            if v is None:
                continue
            whole = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
            if isinstance(v, bool) or not whole or not smallest <= v <= _MAX_SIZE:
                raise self.config_error(f"sets {key} to {v!r}; it must be a whole number, {smallest} to {_MAX_SIZE}")
        for key in ("rms_norm_eps", "layer_norm_eps", "rope_theta"):
            v = self.hparams.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf):
                raise self.config_error(f"sets {key} to {v!r}; it must be a finite number >= 0")

    def hparam(self, *keys: str, default: Any = KeyError) -> Any:
        for k in keys:
            if self.hparams.get(k) is not None:
                return self.hparams[k]
        if default is KeyError:
            raise CheckpointError(f"config.json of '{self.ckpt.label}' has none of {', '.join(keys)}")
        return default

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """rope settings, whether config.json says rope_parameters (transformers
        5), or rope_scaling plus a top-level rope_theta (older files)."""
        params = dict(self.hparams.get("rope_parameters") or self.hparams.get("rope_scaling") or {})
        params.setdefault("rope_type", params.get("type", "default"))
        if "rope_theta" not in params and self.hparams.get("rope_theta") is not None:
            params["rope_theta"] = self.hparams["rope_theta"]
        return params

    def n_head_kv(self) -> int:
        return int(self.hparam("num_key_value_heads", default=self.hparam("num_attention_heads")))

    def attention_lengths(self) -> tuple[int, int] | None:
        """(key_length, value_length) when config.json sets head_dim."""
        head_dim = self.hparams.get("head_dim")
        return (int(head_dim), int(head_dim)) if head_dim else None

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        """The `{arch}.*` metadata llama.cpp reads for this architecture."""
        h = self.hparams
        w.add_block_count(self.block_count)
        w.add_context_length(int(self.hparam("max_position_embeddings", "n_positions")))
        w.add_embedding_length(int(self.hparam("hidden_size")))
        if h.get("intermediate_size") is not None:
            w.add_feed_forward_length(int(h["intermediate_size"]))
        w.add_head_count(int(self.hparam("num_attention_heads")))
        w.add_head_count_kv(self.n_head_kv())
        w.add_layer_norm_rms_eps(float(self.hparam("rms_norm_eps", default=1e-6)))
        w.add_expert_count(self.n_expert)
        w.add_expert_used_count(int(self.hparam("num_experts_per_tok", "num_experts_per_token", "moe_topk")))
        if (lengths := self.attention_lengths()) is not None:
            w.add_key_length(lengths[0])
            w.add_value_length(lengths[1])
        self.write_rope(w)

    def write_rope(self, w: gguf.GGUFWriter) -> None:
        rope = self.rope_parameters
        if rope.get("rope_theta") is not None:
            w.add_rope_freq_base(float(rope["rope_theta"]))
        kind = str(rope.get("rope_type", "default")).lower()
        factor = rope.get("factor")
        if kind in ("default", "none") or factor is None:
            return
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
            if rope.get("beta_fast") is not None:
                w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
            if rope.get("beta_slow") is not None:
                w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
        else:
            raise CheckpointError(
                f"'{self.ckpt.label}' uses rope scaling '{kind}', which this converter does not write for "
                f"{type(self).__name__}; hint: open an issue with the model's config.json"
            )

    # ------------------------------------------------------------------ tensors

    def gguf_name(self, key: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
        if key not in gguf.MODEL_TENSORS[self.gguf_arch]:
            raise CheckpointError(f"{key.name} is not a tensor of llama.cpp's '{self.arch_name}' architecture")
        return gguf.TENSOR_NAMES[key].format(bid=bid) + suffix

    def map_name(self, hf_name: str) -> str:
        """The GGUF name of a checkpoint tensor, from gguf-py's name map."""
        name = hf_name if hf_name.endswith((".weight", ".bias")) else hf_name + ".weight"
        mapped = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise CheckpointError(
                f"checkpoint tensor '{hf_name}' has no GGUF name for llama.cpp's '{self.arch_name}' architecture; "
                "hint: this checkpoint differs from the ones the converter knows (a newer variant?)"
            )
        return mapped

    def transform(self, hf_name: str) -> Callable[[np.ndarray], np.ndarray] | None:
        """A hook for tensors whose layout differs in llama.cpp (row permutations)."""
        return None

    def plan_tensor(self, hf_name: str, ref: TensorRef) -> list[TensorPlan]:
        """The output tensor(s) of one (non-expert) checkpoint tensor."""
        return [TensorPlan(self.map_name(hf_name), ref.shape, whole(ref, self.transform(hf_name)), hf_name)]

    def skip(self, hf_name: str) -> bool:
        if _SKIP.search(hf_name):
            return True
        m = _LAYER.match(hf_name)
        # layers past num_hidden_layers: multi-token-prediction heads llama.cpp does not run
        return m is not None and int(m.group(1)) >= self.block_count

    def expert_plans(self, tensors: dict[str, TensorRef]) -> list[TensorPlan]:
        """Merges per-expert 2-D tensors (and splits fused 3-D ones) into one
        GGUF tensor per layer and projection, [n_expert, n_out, n_in]; removes
        what it used from `tensors`. Fails naming any expert that is missing."""
        groups: dict[tuple[int, str], dict[int, str]] = defaultdict(dict)
        plans: list[TensorPlan] = []
        for name in list(tensors):
            m = self.expert_pattern.match(name)
            if m is not None:
                layer, expert = int(m["layer"]), int(m["expert"])
                if expert >= self.n_expert:
                    raise CheckpointError(f"'{name}' is expert {expert}, but config.json says {self.n_expert} experts")
                groups[(layer, self.proj_names[m["proj"]])][expert] = name
                continue
            f = self.fused_pattern.match(name)
            if f is not None:
                plans += self.fused_expert_plans(int(f["layer"]), f["proj"], tensors.pop(name), name)
        for (layer, proj), by_expert in sorted(groups.items()):
            missing = [e for e in range(self.n_expert) if e not in by_expert]
            if missing:
                first = by_expert[min(by_expert)]
                m = self.expert_pattern.match(first)
                assert m is not None
                example = first[: m.start("expert")] + str(missing[0]) + first[m.end("expert") :]
                raise CheckpointError(
                    f"expert tensor '{example}' is missing: layer {layer} has {len(by_expert)} of {self.n_expert} "
                    f"'{proj}' experts, so they cannot be merged; hint: the checkpoint is incomplete"
                )
            refs = [tensors.pop(by_expert[e]) for e in range(self.n_expert)]
            shapes = {r.shape for r in refs}
            if len(shapes) != 1 or len(refs[0].shape) != 2:
                raise CheckpointError(
                    f"the '{proj}' experts of layer {layer} have shapes {sorted(shapes)}; expected one 2-D shape"
                )
            plans.append(
                TensorPlan(
                    self.gguf_name(EXPERT_PROJ[proj], layer),
                    (self.n_expert, *refs[0].shape),
                    stacked(refs),
                    f"{by_expert[0]} … ({self.n_expert} experts)",
                )
            )
        return plans

    def fused_expert_plans(self, layer: int, proj: str, ref: TensorRef, hf_name: str) -> list[TensorPlan]:
        """Experts stored as [n_expert, n_out, n_in] (gate_up_proj: gate rows then up rows)."""
        if len(ref.shape) != 3 or ref.shape[0] != self.n_expert:
            raise CheckpointError(f"'{hf_name}' has shape {ref.shape}; expected [{self.n_expert}, n_out, n_in]")
        n_expert, n_out, n_in = ref.shape
        if proj != "gate_up_proj":
            name = self.gguf_name(EXPERT_PROJ[self.proj_names[proj]], layer)
            return [TensorPlan(name, ref.shape, fused_part(ref, lambda e: e), hf_name)]
        if n_out % 2:
            raise CheckpointError(f"'{hf_name}' has an odd number of rows ({n_out}); cannot split it into gate and up")
        half = n_out // 2
        gate = fused_part(ref, lambda e: (e, slice(0, half)))
        up = fused_part(ref, lambda e: (e, slice(half, n_out)))
        shape = (n_expert, half, n_in)
        return [
            TensorPlan(self.gguf_name(EXPERT_PROJ["gate"], layer), shape, gate, hf_name),
            TensorPlan(self.gguf_name(EXPERT_PROJ["up"], layer), shape, up, hf_name),
        ]

    def plan(self) -> list[TensorPlan]:
        """Every output tensor, in file order; raises before anything is read
        if a tensor cannot be mapped or an expert is missing."""
        tensors: dict[str, TensorRef] = {}
        for name, ref in self.ckpt.tensors.items():
            if self.skip(name):
                self.skipped.append(name)
            else:
                tensors[name] = ref
        layers = {int(m.group(1)) for n in self.skipped if (m := _LAYER.match(n))}
        mtp = int(self.hparams.get("num_nextn_predict_layers") or 0)  # DeepSeek-V3's extra layers, not run
        beyond = sorted(n for n in layers if n >= self.block_count + mtp)
        if beyond:
            raise self.config_error(
                f"says {self.block_count} layers (num_hidden_layers), but the checkpoint has layer {beyond[-1]}"
            )
        plans = self.expert_plans(tensors)
        for name, ref in tensors.items():
            plans += self.plan_tensor(name, ref)
        seen: dict[str, str] = {}
        for p in plans:
            if p.name in seen:
                raise CheckpointError(f"checkpoint tensors '{seen[p.name]}' and '{p.source}' both map to '{p.name}'")
            seen[p.name] = p.source
        if not any(p.name.endswith("_exps.weight") for p in plans):
            raise CheckpointError(f"'{self.ckpt.label}' has no expert tensors; hint: is it a Mixture-of-Experts model?")

        def order(p: TensorPlan) -> tuple[int, int]:
            b = p.block
            return (0 if p.name.startswith("token_embd") else 2, 0) if b is None else (1, b)

        return sorted(plans, key=order)


_REGISTRY: dict[str, type[MoEConverter]] = {}


def register(cls: type[MoEConverter]) -> type[MoEConverter]:
    for name in cls.hf_architectures:
        _REGISTRY[name] = cls
    return cls


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def converter_class(config: dict[str, Any], label: str) -> type[MoEConverter]:
    archs = config.get("architectures") or []
    for a in archs:
        if a in _REGISTRY:
            return _REGISTRY[a]
    found = ", ".join(archs) if archs else f"none (model_type {config.get('model_type')!r})"
    raise ValueError(
        f"'{label}' is architecture {found}, which pymoe convert does not support; "
        f"supported: {', '.join(supported_architectures())}"
    )
