"""Tokenizers through `pymoe convert`: llama.cpp must split and merge text as
the checkpoint's own tokenizer does. Byte-level BPE with each pre-tokenizer
pymoe recognises, SentencePiece, special tokens and the chat template."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import gguf
import pytest
from hf_models import CORPUS, build_checkpoint, build_tokenizer

from pymoe import Model
from pymoe.convert import KNOWN_PRE_TOKENIZERS, TokenizerError, convert

PROBE = (
    "Hello world! It's 12345 apples, 3.14 and 1000000 more. I'LL go—don't you?\n\n"
    "  indented\ttab  ünïcödé 東京タワーです 한국어 Ελληνικά 🙂\r\nend"
)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("qwen3_moe", tmp_path_factory.mktemp("vocab") / "base")


def with_tokenizer(base: Path, dst: Path, split_regexes: tuple[str, ...] = ()) -> Path:
    shutil.copytree(base, dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).unlink()
    build_tokenizer(dst, split_regexes=split_regexes)
    return dst


@pytest.mark.parametrize("name", sorted(KNOWN_PRE_TOKENIZERS))
def test_bpe_pre_tokenizers_tokenize_like_the_checkpoint(base_ckpt, tmp_path, name):
    from tokenizers import Tokenizer

    splits = () if name == "gpt-2" else KNOWN_PRE_TOKENIZERS[name]
    ckpt = with_tokenizer(base_ckpt, tmp_path / "ck", splits)
    out = tmp_path / "m.gguf"
    convert(ckpt, out, outtype="f32", expert_type="f32", lo_type=None)
    assert gguf.GGUFReader(out).get_field("tokenizer.ggml.pre").contents() == name
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    with Model(out) as m:
        for text in (PROBE, *CORPUS):
            assert m.tokenize(text, add_bos=False) == hf.encode(text, add_special_tokens=False).ids, text


def test_unrecognised_pre_tokenizer_is_refused_with_a_way_out(base_ckpt, tmp_path):
    ckpt = with_tokenizer(base_ckpt, tmp_path / "ck", (r"\w+|[^\w\s]+|\s+",))
    with pytest.raises(TokenizerError, match="--pre-tokenizer"):
        convert(ckpt, tmp_path / "m.gguf", lo_type=None)
    assert not (tmp_path / "m.gguf").exists()
    convert(ckpt, tmp_path / "m.gguf", lo_type=None, pre_tokenizer="gpt-2")
    assert gguf.GGUFReader(tmp_path / "m.gguf").get_field("tokenizer.ggml.pre").contents() == "gpt-2"


def test_sentencepiece_tokenizer(base_ckpt, tmp_path):
    import sentencepiece as spm

    ckpt = tmp_path / "ck"
    shutil.copytree(base_ckpt, ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).unlink()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8),
        model_writer=buf,
        vocab_size=360,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        normalization_rule_name="identity",  # as Llama and Mixtral ship it
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (ckpt / "tokenizer.model").write_bytes(buf.getvalue())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    config = json.loads((ckpt / "config.json").read_text())
    config.update(bos_token_id=1, eos_token_id=2)  # SentencePiece's own ids, as Llama/Mixtral configs say
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m.gguf"
    convert(ckpt, out, outtype="f32", expert_type="f32", lo_type=None)
    r = gguf.GGUFReader(out)
    assert r.get_field("tokenizer.ggml.model").contents() == "llama"
    assert len(r.get_field("tokenizer.ggml.scores").contents()) == config["vocab_size"]
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    with Model(out) as m:
        for text in (PROBE, *CORPUS):
            assert m.tokenize(text) == [1, *sp.encode(text)], text


def test_special_tokens_and_chat_template_are_carried_over(base_ckpt, tmp_path):
    from tokenizers import AddedToken, Tokenizer

    ckpt = tmp_path / "ck"
    shutil.copytree(base_ckpt, ckpt)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    n = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(ckpt / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (ckpt / "chat_template.jinja").write_text(template)
    config = json.loads((ckpt / "config.json").read_text())
    config["vocab_size"] = n + 2
    (ckpt / "config.json").write_text(json.dumps(config))
    # the embedding and output rows for the two new tokens
    import numpy as np
    from safetensors.numpy import load_file, save_file

    t = load_file(ckpt / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        t[k] = np.concatenate([t[k], np.zeros((2, t[k].shape[1]), np.float32)])
    save_file(t, ckpt / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "m.gguf"
    convert(ckpt, out, outtype="f32", expert_type="f32", lo_type=None)
    r = gguf.GGUFReader(out)
    types = r.get_field("tokenizer.ggml.token_type").contents()
    assert types[n] == types[n + 1] == gguf.TokenType.CONTROL
    with Model(out) as m:
        assert m.chat_template() == template
        assert m.tokenize("<|im_start|>user", add_bos=False, special=True)[0] == n
        prompt = m.format_chat([{"role": "user", "content": "Hi"}])
        assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_sentencepiece_normalizer_is_read_from_the_model():
    import sentencepiece as spm

    from pymoe.convert.vocab import sentencepiece_normalizer

    specs = {}
    for rule, extra_ws in (("identity", False), ("nmt_nfkc", True)):
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS * 8),
            model_writer=buf,
            vocab_size=120,
            hard_vocab_limit=False,
            normalization_rule_name=rule,
            remove_extra_whitespaces=extra_ws,
            add_dummy_prefix=extra_ws,
            minloglevel=2,
        )
        specs[rule] = sentencepiece_normalizer(buf.getvalue())
    assert specs["identity"] == {"name": "identity", "add_dummy_prefix": False, "remove_extra_whitespaces": False}
    assert specs["nmt_nfkc"] == {"name": "nmt_nfkc", "add_dummy_prefix": True, "remove_extra_whitespaces": True}
