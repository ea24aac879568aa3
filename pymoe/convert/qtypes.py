"""ggml tensor types as the converter uses them: parsing the user's spelling,
checking that ggml can quantise to a type without an importance matrix, and
the per-tensor fallback when a row length does not fit a type's block."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from .. import _core

# What a type falls back to when a tensor's row length (ggml ne[0]) is not a
# multiple of its block length: the choice llama-quantize makes, so that the
# files we write look like the ones it writes. F16 when even that does not fit.
_FALLBACK = {
    "q2_K": "q4_0",
    "q3_K": "q4_0",
    "tq1_0": "q4_0",
    "tq2_0": "q4_0",
    "q4_K": "q5_0",
    "q5_K": "q5_1",
    "q6_K": "q8_0",
    "iq4_xs": "iq4_nl",
    "iq3_s": "iq4_nl",
    "iq3_xxs": "iq4_nl",
    "iq2_s": "iq4_nl",
}

# general.file_type for a file whose experts (most of its bytes) have this type
_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "iq4_xs": gguf.LlamaFileType.MOSTLY_IQ4_XS,
    "iq4_nl": gguf.LlamaFileType.MOSTLY_IQ4_NL,
    "q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_M,
    "q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
    "mxfp4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
}


def quant_types() -> list[str]:
    """Every type ggml quantises to without an importance matrix."""
    return list(_core.quant_types())


def parse_type(spelling: str, what: str = "type") -> str:
    """The ggml name of a type written any case (`Q4_K`, `q4_k`, `BF16` ...)."""
    known = quant_types()
    by_lower = {t.lower(): t for t in known}
    name = by_lower.get(spelling.strip().lower())
    if name is None:
        raise ValueError(
            f"{what} '{spelling}' is not a type ggml can quantise to here; choose one of: {', '.join(known)}"
        )
    return name


def gguf_type(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType(int(_core.type_info(name)["id"]))


def block_size(name: str) -> int:
    return int(_core.type_info(name)["block_size"])


def file_type(expert_type: str) -> gguf.LlamaFileType | None:
    return _FILE_TYPE.get(expert_type)


@dataclass(frozen=True)
class TypeChoice:
    wanted: str
    type: str

    @property
    def fell_back(self) -> bool:
        return self.type != self.wanted


def fit_type(wanted: str, row_length: int) -> TypeChoice:
    """`wanted`, or its fallback when `row_length` is not a multiple of its block."""
    if row_length % block_size(wanted) == 0:
        return TypeChoice(wanted, wanted)
    fallback = _FALLBACK.get(wanted, wanted)
    if row_length % block_size(fallback) != 0:
        fallback = "f16"
    return TypeChoice(wanted, fallback)


def row_bytes(type_name: str, row_length: int) -> int:
    return int(_core.row_size(type_name, row_length))
