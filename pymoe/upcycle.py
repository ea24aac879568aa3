"""Sparse upcycling: a dense llama-family GGUF becomes a Mixtral-style MoE.

Every layer's FFN (gate, up, down) is copied, bytes unchanged, into each of
`n_expert` experts, and a random router (`ffn_gate_inp`) is added. With
identical experts and top-k weights normalised to sum to one (llama.cpp does
so for this architecture), each layer's output equals the dense FFN's; the
router is built so that this holds bit for bit (see `router_weights`). The
model speaks exactly like the dense one while every token goes through the
MoE code paths (routing, expert selection, per-expert matmuls). pymoe's demo
model is built this way from SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ._atomic import atomic_output

FFN_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.weight$")
SUPPORTED_ARCHS = ("llama",)


class UpcycleError(ValueError):
    pass


def router_weights(
    rng: np.random.Generator, n_expert: int, n_expert_used: int, n_embd: int, grouped: bool = True
) -> np.ndarray:
    """A random router [n_embd, n_expert] (ggml order) whose experts come in
    groups of `n_expert_used` with identical rows.

    Identical rows give identical logits, so a token's top-k is always one
    whole group, its k weights are exactly equal and normalise to exactly 1/k
    (a power of two for k = 1, 2, 4 ...), and the weighted sum of the k equal
    expert outputs is the dense output bit for bit. Which group wins still
    varies from token to token and layer to layer.

    grouped=False: every expert its own random row; the weights then vary
    (e.g. 0.8 / 0.2), which mixed-precision studies need, and the output
    equals the dense model's only up to float rounding."""
    if not grouped:
        return (rng.standard_normal((n_expert, n_embd)) * (4.0 / np.sqrt(n_embd))).astype(np.float32)
    n_groups = n_expert // n_expert_used
    rows = (rng.standard_normal((n_groups, n_embd)) * (4.0 / np.sqrt(n_embd))).astype(np.float32)
    return np.repeat(rows, n_expert_used, axis=0)  # numpy [n_expert, n_embd]


def upcycle(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    n_expert: int = 4,
    n_expert_used: int = 2,
    seed: int = 0,
    grouped: bool = True,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Writes the upcycled MoE of the dense GGUF `src` to `dst` (atomically)."""
    import gguf

    src, dst = Path(src), Path(dst)
    if not 1 <= n_expert_used <= n_expert:
        raise UpcycleError(f"need 1 <= n_expert_used ({n_expert_used}) <= n_expert ({n_expert})")
    if grouped and (n_expert % n_expert_used or n_expert_used & (n_expert_used - 1)):
        raise UpcycleError(
            f"n_expert ({n_expert}) must be a multiple of n_expert_used ({n_expert_used}), "
            "which must be a power of two, for the MoE to equal the dense model exactly"
        )
    reader = gguf.GGUFReader(src)
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field else None
    if arch not in SUPPORTED_ARCHS:
        raise UpcycleError(
            f"'{src}': architecture {arch!r} cannot be upcycled; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    if reader.get_field(f"{arch}.expert_count") is not None:
        raise UpcycleError(f"'{src}' is already a MoE model")

    rng = np.random.default_rng(seed)
    with atomic_output(dst, inputs=(src,), force=force) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for name, fld in reader.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment", "general.name"):
                continue
            sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, fld.contents(), fld.types[0], sub)
        base_name = reader.get_field("general.name")
        label = (
            f"{base_name.contents() if base_name else src.stem} (upcycled MoE, {n_expert} experts, top-{n_expert_used})"
        )
        writer.add_key_value("general.name", label, gguf.GGUFValueType.STRING)
        writer.add_key_value(f"{arch}.expert_count", n_expert, gguf.GGUFValueType.UINT32)
        writer.add_key_value(f"{arch}.expert_used_count", n_expert_used, gguf.GGUFValueType.UINT32)
        writer.add_key_value("pymoe.upcycle.source", src.name, gguf.GGUFValueType.STRING)
        writer.add_key_value("pymoe.upcycle.seed", seed, gguf.GGUFValueType.UINT32)

        n_embd = None
        layers_done: set[int] = set()
        for t in reader.tensors:
            m = FFN_TENSOR.match(t.name)
            raw = t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            if m is None:
                if t.name == "token_embd.weight":
                    n_embd = int(t.shape[0])
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type if raw else None)
                continue
            layer, proj = int(m.group(1)), m.group(2)
            # [n_in, n_out] -> [n_in, n_out, n_expert] (ggml order): the same bytes per expert
            stacked = np.broadcast_to(t.data, (n_expert, *t.data.shape))
            writer.add_tensor(
                f"blk.{layer}.ffn_{proj}_exps.weight",
                np.ascontiguousarray(stacked),
                raw_dtype=t.tensor_type if raw else None,
            )
            layers_done.add(layer)
        if n_embd is None or not layers_done:
            raise UpcycleError(f"'{src}' has no token embedding or no FFN tensors to upcycle")
        for layer in sorted(layers_done):
            router = router_weights(rng, n_expert, n_expert_used, n_embd, grouped)
            writer.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", router)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return dst
