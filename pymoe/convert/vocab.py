"""The tokenizer of a checkpoint as llama.cpp wants it in a GGUF: byte-level
BPE from tokenizer.json (with the name of the llama.cpp pre-tokenizer that
splits text the same way) or SentencePiece from tokenizer.model; special
token ids, add-BOS/EOS flags and the chat template through gguf-py's
SpecialVocab.

llama.cpp does not read a pre-tokenizer's regex from the file: it knows a
fixed set by name. We recognise the set from the regexes in tokenizer.json
itself; a tokenizer whose splitting we cannot match is refused with a clear
error (pass the name explicitly with --pre-tokenizer if you know it)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

logger = logging.getLogger("pymoe.convert")

# The regexes of the byte-level BPE tokenizers llama.cpp implements, as
# tokenizer.json files spell them (Split patterns in order, then ByteLevel),
# keyed by the llama.cpp pre-tokenizer name that reproduces them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"""
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[A-Za-z"
    "\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d"
    "\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15"
    "\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc"
    "\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f"
    "\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+",
    r"\s?[!-/:-~" "\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}+",
)

KNOWN_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2,),
    "llama-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "gpt-4o": (_O200K,),
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-llm": _DEEPSEEK_LLM,
}


def _canonical(pattern: str) -> str:
    # tokenizer.json files write CR/LF both as escapes and as the characters
    return pattern.replace("\\r", "\r").replace("\\n", "\n")


_BY_SPLITS = {tuple(_canonical(p) for p in splits): name for name, splits in KNOWN_PRE_TOKENIZERS.items()}


class TokenizerError(ValueError):
    pass


def byte_level_splits(pre_tokenizer: dict[str, Any] | None) -> tuple[str, ...] | None:
    """The regexes a byte-level BPE pre-tokenizer splits with, in order; None
    when it is not byte-level or does something a regex list cannot say."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    splits: list[str] = []
    byte_level = False
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and not byte_level:
            pattern = step.get("pattern", {})
            if step.get("behavior") != "Isolated" or step.get("invert"):
                return None
            if "Regex" in pattern:
                splits.append(_canonical(pattern["Regex"]))
            elif "String" in pattern:
                return None
        elif kind == "ByteLevel" and not byte_level:
            byte_level = True
            if step.get("use_regex", True):
                splits.append(_canonical(_GPT2))
        else:
            return None
    return tuple(splits) if byte_level and splits else None


def recognise_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    splits = byte_level_splits(tokenizer_json.get("pre_tokenizer"))
    return _BY_SPLITS.get(splits) if splits else None


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # tokenizer.ggml.pre
    tokens: list[str]
    toktypes: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: gguf.SpecialVocab | None = None
    add_space_prefix: bool | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.toktypes)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.special is not None:
            self.special.add_to_gguf(w, quiet=True)

    @property
    def has_chat_template(self) -> bool:
        return self.special is not None and self.special.chat_template is not None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _special_vocab(folder: Path, n_vocab: int) -> gguf.SpecialVocab:
    # gguf-py's SpecialVocab logs each special token at INFO level: keep that quiet
    gguf_logger = logging.getLogger("gguf.vocab")
    level = gguf_logger.level
    gguf_logger.setLevel(logging.WARNING)
    try:
        return gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
    finally:
        gguf_logger.setLevel(level)


def _padded(tokens: dict[int, tuple[str, int]], n_vocab: int, where: str) -> tuple[list[str], list[int]]:
    if tokens and max(tokens) >= n_vocab:
        raise TokenizerError(
            f"{where} has token id {max(tokens)}, but the model's vocab_size is {n_vocab}; "
            "hint: the tokenizer does not belong to this checkpoint"
        )
    texts, types = [], []
    for i in range(n_vocab):
        text, typ = tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        texts.append(text)
        types.append(int(typ))
    return texts, types


def load_bpe(folder: Path, n_vocab: int, pre_tokenizer: str | None = None) -> Vocab:
    path = folder / "tokenizer.json"
    tj = _read_json(path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"'{path}' is a {model.get('type')} tokenizer; only byte-level BPE is read from tokenizer.json"
        )
    pre = pre_tokenizer or recognise_pre_tokenizer(tj)
    if pre is None:
        raise TokenizerError(
            f"the pre-tokenizer in '{path}' ({json.dumps(tj.get('pre_tokenizer'))[:160]}) is not one llama.cpp "
            f"implements as far as pymoe can tell (it knows: {', '.join(KNOWN_PRE_TOKENIZERS)}); hint: if you know "
            "which llama.cpp pre-tokenizer splits text the same way, pass --pre-tokenizer NAME"
        )
    tokens: dict[int, tuple[str, int]] = {int(i): (t, gguf.TokenType.NORMAL) for t, i in model.get("vocab", {}).items()}
    for added in tj.get("added_tokens", []):
        typ = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[int(added["id"])] = (added["content"], typ)
    texts, types = _padded(tokens, n_vocab, str(path))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab("gpt2", pre, texts, types, merges=merges, special=_special_vocab(folder, n_vocab))


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _proto_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """The fields of one protobuf message (wire format), by field number."""
    fields: dict[int, list[int | bytes]] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        num, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i : i + n], i + n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = int.from_bytes(data[i : i + size], "little"), i + size
        else:
            raise TokenizerError(f"unexpected protobuf wire type {wire}")
        fields.setdefault(num, []).append(value)
    return fields


def sentencepiece_normalizer(model: bytes) -> dict[str, Any]:
    """name, add_dummy_prefix and remove_extra_whitespaces of a SentencePiece
    model's NormalizerSpec (ModelProto field 3), with the proto's defaults."""
    spec_raw = _proto_fields(model).get(3, [b""])[0]
    spec = _proto_fields(spec_raw if isinstance(spec_raw, bytes) else b"")

    def flag(num: int, default: bool) -> bool:
        return bool(spec[num][0]) if num in spec else default

    name = spec.get(1, [b""])[0]
    return {
        "name": name.decode() if isinstance(name, bytes) else "",
        "add_dummy_prefix": flag(3, True),
        "remove_extra_whitespaces": flag(4, True),
    }


def load_sentencepiece(folder: Path, n_vocab: int) -> Vocab:
    path = folder / "tokenizer.model"
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise ImportError(f"reading '{path}' needs sentencepiece; hint: pip install 'pymoe[convert]'") from e
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"'{path}' is not a SentencePiece model: {e}") from e
    tokens: dict[int, tuple[str, int]] = {}
    scores: dict[int, float] = {}
    for i in range(sp.vocab_size()):
        if sp.IsUnknown(i):
            typ = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            typ = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            typ = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            typ = gguf.TokenType.BYTE
        else:
            typ = gguf.TokenType.NORMAL
        tokens[i] = (sp.IdToPiece(i), typ)
        scores[i] = float(sp.GetScore(i))
    config = _read_json(folder / "tokenizer_config.json")
    added = {int(i): t for i, t in config.get("added_tokens_decoder", {}).items()}
    for content, token_id in _read_json(folder / "added_tokens.json").items():
        added.setdefault(int(token_id), {"content": content, "special": True})
    for token_id, t in added.items():
        if token_id >= sp.vocab_size():
            typ = gguf.TokenType.CONTROL if t.get("special", True) else gguf.TokenType.USER_DEFINED
            tokens[token_id] = (t["content"], typ)
            scores[token_id] = -1000.0
    texts, types = _padded(tokens, n_vocab, str(path))
    norm = sentencepiece_normalizer(path.read_bytes())
    if norm["name"] not in ("identity", "") or norm["remove_extra_whitespaces"]:
        logger.warning(
            "%s normalises text (%s%s), which llama.cpp's SentencePiece tokenizer does not: "
            "some texts will tokenize differently",
            path,
            norm["name"],
            ", removes extra whitespace" if norm["remove_extra_whitespaces"] else "",
        )
    add_prefix = config.get("add_prefix_space", norm["add_dummy_prefix"])
    return Vocab(
        "llama",
        None,
        texts,
        types,
        scores=[scores.get(i, -1000.0) for i in range(n_vocab)],
        special=_special_vocab(folder, n_vocab),
        add_space_prefix=bool(add_prefix),
    )


def load_vocab(folder: Path, n_vocab: int, pre_tokenizer: str | None = None) -> Vocab:
    """The checkpoint's tokenizer: byte-level BPE when tokenizer.json is one,
    else SentencePiece from tokenizer.model."""
    tj = _read_json(folder / "tokenizer.json")
    byte_level = tj.get("model", {}).get("type") == "BPE" and byte_level_splits(tj.get("pre_tokenizer")) is not None
    if tj and (byte_level or (pre_tokenizer and not (folder / "tokenizer.model").is_file())):
        return load_bpe(folder, n_vocab, pre_tokenizer)
    if (folder / "tokenizer.model").is_file():
        return load_sentencepiece(folder, n_vocab)
    if tj:
        return load_bpe(folder, n_vocab, pre_tokenizer)  # raises with the details of what it found
    raise FileNotFoundError(
        f"'{folder}' has neither tokenizer.json nor tokenizer.model; hint: copy the model's tokenizer files there"
    )
