"""A Hugging Face checkpoint on disk: its config and its safetensors tensors,
read lazily one tensor (or one slice of a tensor) at a time.

The safetensors format is a little-endian u64 header length, a JSON header
(name -> dtype, shape, byte range) and the raw data. Reading it here, with
NumPy memory maps, keeps the converter free of torch and keeps memory near
the size of the tensor being converted; bf16 becomes float32 exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# safetensors dtype -> (numpy storage dtype, is a float we convert)
_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # stored as the upper 16 bits of a float32
}
_MAX_HEADER = 100 << 20
# bytes per element of every safetensors dtype (the converter reads only the float ones)
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2,
             "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}  # fmt: skip


class CheckpointError(ValueError):
    pass


@dataclass
class TensorRef:
    """Where one tensor's bytes are: file, dtype, shape and byte range."""

    name: str
    file: Path
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int

    def _check_dtype(self) -> np.dtype[Any]:
        dt = _DTYPES.get(self.dtype)
        if dt is None:
            raise CheckpointError(
                f"tensor '{self.name}' in '{self.file.name}' is {self.dtype}; the converter reads BF16, F16 and F32 "
                "checkpoints; hint: use an unquantised (bf16/f16/f32) copy of the model"
            )
        return dt

    def _map(self) -> np.ndarray:
        dt = self._check_dtype()
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype=dt)
        return np.memmap(self.file, dtype=dt, mode="r", offset=self.start, shape=self.shape)

    def load(self, index: Any = ...) -> np.ndarray:
        """float32 copy of the tensor, or of `tensor[index]` (read from disk
        lazily: only the slice's pages are touched)."""
        raw = self._map()[index]
        out = to_float32(np.asarray(raw), self.dtype)
        del raw
        return out


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float32 values of raw F32/F16/BF16 storage (a new C-contiguous array)."""
    if dtype == "BF16":
        return np.ascontiguousarray((raw.astype(np.uint32) << 16).view(np.float32))
    return np.ascontiguousarray(raw, dtype=np.float32)


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"'{path}' is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise CheckpointError(f"'{path}' is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path}' is not a safetensors file: {e}") from e
    size = path.stat().st_size
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"'{path}': the header entry of tensor '{name}' is malformed ({e})") from e
        if base + end > size:
            raise CheckpointError(f"'{path}' is truncated: tensor '{name}' ends past the end of the file")
        if begin < 0 or end < begin or any(d < 0 for d in shape):
            raise CheckpointError(f"'{path}': tensor '{name}' has offsets {begin}..{end} and shape {list(shape)}")
        if dtype in _ITEMSIZE and end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise CheckpointError(
                f"'{path}': tensor '{name}' holds {end - begin} bytes, but {dtype} values of shape {list(shape)} take "
                f"{math.prod(shape) * _ITEMSIZE[dtype]}; hint: the file is corrupt; download it again"
            )
        out[name] = TensorRef(name, path, dtype, shape, base + begin, end - begin)
    return out


class Checkpoint:
    """config.json and the safetensors tensors of a checkpoint folder (one
    file or shards with a `model.safetensors.index.json`)."""

    def __init__(self, folder: str | os.PathLike[str], label: str | None = None) -> None:
        self.dir = Path(folder)
        self.label = label or self.dir.name
        config = self.dir / "config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"'{self.dir}' has no config.json; hint: pass a Hugging Face model folder or a hub repo id"
            )
        self.config: dict[str, Any] = json.loads(config.read_text(encoding="utf-8"))
        self.tensors = self._index()

    def _index(self) -> dict[str, TensorRef]:
        index_file = self.dir / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map: dict[str, str] = json.loads(index_file.read_text(encoding="utf-8")).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"'{self.dir}' lacks {len(missing)} shard(s) named in {index_file.name}, e.g. '{missing[0]}'; "
                    "hint: the download is incomplete; fetch it again"
                )
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = {}
        if not files:
            hint = "convert .bin checkpoints to safetensors first" if any(self.dir.glob("*.bin")) else "check the path"
            raise FileNotFoundError(f"'{self.dir}' has no .safetensors files; hint: {hint}")
        tensors: dict[str, TensorRef] = {}
        for f in files:
            for name, ref in read_safetensors_header(self.dir / f).items():
                if name in tensors:
                    raise CheckpointError(f"tensor '{name}' is in both '{tensors[name].file.name}' and '{f}'")
                tensors[name] = ref
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"'{index_file}' lists {len(absent)} tensor(s) no shard holds, e.g. '{absent[0]}'")
        return tensors

    @property
    def files(self) -> list[Path]:
        """Every file the conversion reads (so that no output may replace one)."""
        found = {ref.file for ref in self.tensors.values()}
        for name in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            if (self.dir / name).is_file():
                found.add(self.dir / name)
        return sorted(found)

    @property
    def nbytes(self) -> int:
        return sum(ref.nbytes for ref in self.tensors.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]
