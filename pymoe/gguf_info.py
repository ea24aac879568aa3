"""What a GGUF file holds, read from its header only: architecture, expert
layout, and bytes by quant type split into expert and non-expert weights."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _core

GGUF_MAGIC = b"GGUF"

# Routed-expert tensors as llama.cpp names them: one 3-D tensor per layer and
# projection, experts stacked on the last axis (plus per-expert biases/scales).
# Shared experts (`_shexp`) and the router (`ffn_gate_inp`) run for every
# token and are not offloadable experts.
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_(?:ch)?exps\.(weight|bias|scale)$")


def check_gguf_path(path: str | os.PathLike[str]) -> Path:
    """Fails with a clear message unless `path` is a readable file that starts like a GGUF."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model file '{p}' does not exist; hint: check the path")
    if p.is_dir():
        raise IsADirectoryError(
            f"'{p}' is a directory; hint: pass a .gguf file (a Hugging Face folder needs `pymoe convert` first)"
        )
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise OSError(f"cannot read '{p}': {e.strerror}") from e
    if magic != GGUF_MAGIC:
        raise ValueError(f"'{p}' is not a GGUF file (it does not start with 'GGUF'); hint: pass a .gguf model")
    return p


@dataclass
class TensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int
    layer: int | None
    is_expert: bool


@dataclass
class GGUFSummary:
    path: Path
    architecture: str
    name: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    file_size: int
    tensors: list[TensorInfo]
    metadata: dict[str, Any] = field(repr=False)

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.is_expert)

    @property
    def other_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if not t.is_expert)

    @property
    def moe_layers(self) -> list[int]:
        return sorted({t.layer for t in self.tensors if t.is_expert and t.layer is not None})

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and bool(self.moe_layers)

    @property
    def bytes_per_expert(self) -> float:
        """Average bytes of one (layer, expert) pair: what loading one expert moves."""
        n_pairs = len(self.moe_layers) * self.n_expert
        return self.expert_bytes / n_pairs if n_pairs else 0.0

    def bytes_by_type(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"expert": 0, "other": 0})
        for t in self.tensors:
            out[t.type]["expert" if t.is_expert else "other"] += t.nbytes
        return dict(sorted(out.items()))

    def expert_note(self) -> str:
        if not self.is_moe:
            return "dense model: no experts to offload"
        return (
            f"{self.n_expert} experts, {self.n_expert_used} used per token, "
            f"{len(self.moe_layers)} MoE layers; experts are "
            f"{self.expert_bytes / max(1, self.expert_bytes + self.other_bytes):.0%} of the weights"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "architecture": self.architecture,
            "name": self.name,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "n_expert_shared": self.n_expert_shared,
            "moe_layers": len(self.moe_layers),
            "file_size": self.file_size,
            "expert_bytes": self.expert_bytes,
            "other_bytes": self.other_bytes,
            "bytes_per_expert": self.bytes_per_expert,
            "bytes_by_type": self.bytes_by_type(),
            "n_tensors": len(self.tensors),
            "note": self.expert_note(),
        }


def read_header(path: str | os.PathLike[str], max_array: int = 64) -> dict[str, Any]:
    """The raw header as ggml parses it: metadata, tensor table, offsets."""
    p = check_gguf_path(path)
    return _core.read_gguf(str(p), max_array)


def load_problems(path: str | os.PathLike[str]) -> list[str]:
    """What in the file would make llama.cpp abort (or crash at the first
    decode) instead of failing to load, one message each; empty when nothing
    is found. The same native check runs when a model is loaded
    (native/pymoe-validate.cpp), which then raises with these messages."""
    return list(_core.gguf_problems(str(check_gguf_path(path))))


def summarize(path: str | os.PathLike[str]) -> GGUFSummary:
    header = read_header(path)
    meta: dict[str, Any] = header["metadata"]
    arch = str(meta.get("general.architecture", "unknown"))

    def meta_int(key: str) -> int:
        v = meta.get(f"{arch}.{key}", 0)
        return int(v) if isinstance(v, (int, float)) else 0

    tensors = []
    for t in header["tensors"]:
        m = EXPERT_TENSOR.match(t["name"])
        layer_m = re.match(r"^blk\.(\d+)\.", t["name"])
        tensors.append(
            TensorInfo(
                name=t["name"],
                type=t["type"],
                shape=tuple(t["shape"]),
                nbytes=int(t["nbytes"]),
                offset=int(t["offset"]),
                layer=int(layer_m.group(1)) if layer_m else None,
                is_expert=m is not None,
            )
        )
    return GGUFSummary(
        path=Path(path),
        architecture=arch,
        name=str(meta.get("general.name", "")),
        n_layer=meta_int("block_count"),
        n_expert=meta_int("expert_count"),
        n_expert_used=meta_int("expert_used_count"),
        n_expert_shared=meta_int("expert_shared_count"),
        file_size=int(header["file_size"]),
        tensors=tensors,
        metadata=meta,
    )
