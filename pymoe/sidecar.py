"""The low-precision expert sidecar: a GGUF beside a main model file that
holds a second copy of every routed-expert weight in a lower-precision type.

The sidecar is bound to its main file by a fingerprint of that file (see
`fingerprint`), so a pair that does not belong together is refused before any
weight is read. `check_sidecar` is what the engine calls when it opens a pair;
`pymoe convert` writes sidecars (docs/design.md, "Sidecar format").

A sidecar keeps the main file's tensor names and shapes: `blk.N.ffn_up_exps.weight`
is `[n_in, n_out, n_expert]` in both files, experts contiguous on the last
axis, so expert e's bytes start at `offset + e * nbytes / n_expert` in each.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _core
from .gguf_info import EXPERT_TENSOR, check_gguf_path

SIDECAR_VERSION = 1
FINGERPRINT_SCHEME = "pymoe-fp-v1"

# metadata keys of a sidecar
KEY_VERSION = "pymoe.sidecar.version"
KEY_FINGERPRINT = "pymoe.sidecar.main.fingerprint"  # hex sha256, FINGERPRINT_SCHEME
KEY_MAIN_NAME = "pymoe.sidecar.main.name"  # file name of the main file when the sidecar was made (informative)
KEY_LO_TYPE = "pymoe.sidecar.lo_type"  # the requested low type (a tensor may hold a fallback type)
KEY_EXPERT_COUNT = "pymoe.sidecar.expert_count"

_SAMPLE = 64  # bytes read at the start, middle and end of every tensor


def is_expert_weight(name: str) -> bool:
    """A routed-expert weight (`blk.N.ffn_{gate,up,down,gate_up}_exps.weight`):
    the tensors a sidecar holds. Expert biases stay in the main file only."""
    m = EXPERT_TENSOR.match(name)
    return m is not None and m.group(3) == "weight"


def default_sidecar_path(main: str | os.PathLike[str]) -> Path:
    """`model.gguf` -> `model.lo.gguf` (beside the main file)."""
    p = Path(main)
    stem = p.name[: -len(".gguf")] if p.name.endswith(".gguf") else p.name
    return p.with_name(f"{stem}.lo.gguf")


def fingerprint(main: str | os.PathLike[str]) -> str:
    """A sha256 (hex) that identifies a GGUF file's content, cheap even for
    files of tens of GB: it hashes the file size, every header byte (metadata
    and tensor table, up to the data section) and 64 bytes at the start,
    middle and end of each tensor's data. A different model, quantisation or
    metadata changes it; so does almost any change to the weights."""
    path = check_gguf_path(main)
    header = _core.read_gguf(str(path), 0)
    size = int(header["file_size"])
    data_offset = int(header["data_offset"])
    h = hashlib.sha256()
    h.update(FINGERPRINT_SCHEME.encode())
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(data_offset))
        for t in sorted(header["tensors"], key=lambda t: int(t["offset"])):
            offset, nbytes = int(t["offset"]), int(t["nbytes"])
            for start in sorted({0, max(0, nbytes // 2 - _SAMPLE // 2), max(0, nbytes - _SAMPLE)}):
                f.seek(offset + start)
                h.update(f.read(min(_SAMPLE, nbytes - start)))
    return h.hexdigest()


@dataclass
class SidecarTensor:
    name: str
    type: str  # ggml type name of the sidecar copy
    shape: tuple[int, ...]  # ggml order: [n_in, n_out, n_expert]
    offset: int  # absolute offset in the sidecar file
    nbytes: int
    main_type: str
    main_offset: int  # absolute offset in the main file
    main_nbytes: int

    @property
    def n_expert(self) -> int:
        return self.shape[-1]

    def expert_range(self, e: int) -> tuple[int, int]:
        """(offset, nbytes) of expert e's copy in the sidecar file."""
        per = self.nbytes // self.n_expert
        return self.offset + e * per, per


@dataclass
class SidecarInfo:
    path: Path
    main: Path
    lo_type: str
    n_expert: int
    fingerprint: str
    tensors: list[SidecarTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _read_meta(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    header = _core.read_gguf(str(path), 0)
    return header["metadata"], header["tensors"]


def check_sidecar(main: str | os.PathLike[str], sidecar: str | os.PathLike[str]) -> SidecarInfo:
    """Verifies that `sidecar` is the low-precision expert copy of `main` and
    returns its layout; raises ValueError with a way out when it is not."""
    main_p, side_p = check_gguf_path(main), check_gguf_path(sidecar)
    rebuild = f"hint: rebuild it with `pymoe convert {main_p} --sidecar {side_p} --force`"
    meta, tensors = _read_meta(side_p)
    version = meta.get(KEY_VERSION)
    if version is None:
        raise ValueError(f"'{side_p}' is not a pymoe expert sidecar (no {KEY_VERSION}); {rebuild}")
    if int(version) != SIDECAR_VERSION:
        raise ValueError(
            f"'{side_p}' is a version {version} sidecar; this pymoe reads version {SIDECAR_VERSION}; {rebuild}"
        )
    expected = str(meta.get(KEY_FINGERPRINT, ""))
    actual = fingerprint(main_p)
    if expected != actual:
        made_for = meta.get(KEY_MAIN_NAME, "?")
        raise ValueError(
            f"'{side_p}' belongs to another main file (made for '{made_for}', fingerprint {expected[:12]}…; "
            f"'{main_p.name}' has {actual[:12]}…); {rebuild}"
        )
    main_meta, main_tensors = _read_meta(main_p)
    by_name = {t["name"]: t for t in main_tensors}
    arch = str(main_meta.get("general.architecture", ""))
    n_expert = int(meta.get(KEY_EXPERT_COUNT, 0))
    main_n_expert = int(main_meta.get(f"{arch}.expert_count", 0) or 0)
    if n_expert != main_n_expert:
        raise ValueError(f"'{side_p}' has {n_expert} experts per layer, '{main_p}' {main_n_expert}; {rebuild}")
    out = []
    for t in tensors:
        m = by_name.get(t["name"])
        if m is None or not is_expert_weight(t["name"]):
            raise ValueError(
                f"'{side_p}' holds tensor '{t['name']}', which is not an expert weight of '{main_p}'; {rebuild}"
            )
        if tuple(m["shape"]) != tuple(t["shape"]):
            raise ValueError(
                f"'{side_p}': '{t['name']}' has shape {tuple(t['shape'])}, the main file {tuple(m['shape'])}; {rebuild}"
            )
        out.append(
            SidecarTensor(
                name=t["name"],
                type=t["type"],
                shape=tuple(t["shape"]),
                offset=int(t["offset"]),
                nbytes=int(t["nbytes"]),
                main_type=m["type"],
                main_offset=int(m["offset"]),
                main_nbytes=int(m["nbytes"]),
            )
        )
    missing = sorted(set(n for n in by_name if is_expert_weight(n)) - {t.name for t in out})
    if missing:
        raise ValueError(
            f"'{side_p}' lacks {len(missing)} expert tensor(s) of '{main_p}', e.g. '{missing[0]}'; {rebuild}"
        )
    return SidecarInfo(
        path=side_p,
        main=main_p,
        lo_type=str(meta.get(KEY_LO_TYPE, "")),
        n_expert=n_expert,
        fingerprint=actual,
        tensors=out,
    )
