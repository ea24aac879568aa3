"""Copies of a GGUF file with metadata values or tensors replaced: the
hostile-but-parseable files of the robustness tests (one lying key, a weight
in a type its consumers cannot read), written with the `gguf` package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

VT = gguf.GGUFValueType

# keys the writer adds itself
_WRITER_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture")


def rewrite_gguf(
    src: Path,
    dst: Path,
    *,
    kv: dict[str, tuple[Any, gguf.GGUFValueType]] | None = None,
    drop: tuple[str, ...] = (),
    tensors: dict[str, tuple[np.ndarray, tuple[int, ...], gguf.GGMLQuantizationType]] | None = None,
) -> Path:
    """`src` with the metadata in `kv` set (key -> (value, type); a list value
    with type ARRAY is written as an array of the first element's type), the
    keys in `drop` removed, and the tensors in `tensors` replaced by raw bytes
    (name -> (data, ggml shape, ggml type); the data is reshaped to rows of
    the type's bytes)."""
    kv, tensors = dict(kv or {}), dict(tensors or {})
    r = gguf.GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch)
    for name, field in r.fields.items():
        if name in _WRITER_KEYS or name in drop:
            continue
        if name in kv:
            value, vtype = kv.pop(name)
        else:
            value, vtype = field.contents(), field.types[0]
        _add(w, name, value, vtype, field.types[1] if len(field.types) > 1 else None)
    for name, (value, vtype) in kv.items():
        _add(w, name, value, vtype, None)
    for t in r.tensors:
        if t.name in tensors:
            data, shape, qtype = tensors.pop(t.name)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows = (*reversed(shape[1:]), shape[0] // block * size)  # bytes, numpy order
            w.add_tensor(
                t.name, np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8).reshape(rows), raw_dtype=qtype
            )
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    assert not tensors, f"no such tensors: {list(tensors)}"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _add(w: gguf.GGUFWriter, name: str, value: Any, vtype: gguf.GGUFValueType, sub: gguf.GGUFValueType | None) -> None:
    if vtype == VT.ARRAY:
        w.add_key_value(name, list(value), VT.ARRAY, sub_type=sub)
    else:
        w.add_key_value(name, value, vtype)
