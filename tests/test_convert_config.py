"""`pymoe convert` refuses what it would write broken: a config.json that
lies about the tensors (every kind below used to exit 0 with a GGUF that
llama.cpp does not load, or to print a `struct.error` traceback), a
safetensors header whose byte ranges do not fit its shapes, and a full disk
named as such. Nothing is written in any of these cases."""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import run_pymoe
from hf_models import build_checkpoint

from pymoe.convert import convert
from pymoe.convert.writer import GGUFStream


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Mixtral: hidden 128, 4 heads of 32, 2 KV heads, 4 layers, 8 experts top-2 of ff 192, vocab 384
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("ck") / "mixtral")


def lying(ckpt: Path, tmp_path: Path, **config: object) -> Path:
    out = tmp_path / "lying"
    shutil.copytree(ckpt, out)
    c = json.loads((out / "config.json").read_text())
    c.update(config)
    (out / "config.json").write_text(json.dumps(c))
    return out


LIES = {
    "negative hidden size": ({"hidden_size": -128}, "sets hidden_size to -128"),
    "hidden size of another model": ({"hidden_size": 64}, "tensor 'token_embd.weight' has wrong shape"),
    "more heads": ({"num_attention_heads": 8}, "tensor 'blk.0.attn_k.weight' has wrong shape"),
    "more KV heads": ({"num_key_value_heads": 4}, "tensor 'blk.0.attn_k.weight' has wrong shape"),
    "a head size of another model": ({"head_dim": 16}, "tensor 'blk.0.attn_q.weight' has wrong shape"),
    "fewer layers than the tensors": ({"num_hidden_layers": 2}, "says 2 layers (num_hidden_layers)"),
    "more layers than the tensors": ({"num_hidden_layers": 6}, "'blk.4.attn_norm.weight' not found"),
    "a larger vocabulary": ({"vocab_size": 500}, "tensor 'token_embd.weight' has wrong shape"),
    "another expert size": ({"intermediate_size": 100}, "tensor 'blk.0.ffn_gate_exps.weight' has wrong shape"),
    "more experts per token than experts": ({"num_experts_per_tok": 9}, "uses 9 experts (num_experts_per_tok) of 8"),
    "no experts": ({"num_local_experts": 0}, "sets num_local_experts to 0"),
    "too many layers for llama.cpp": ({"num_hidden_layers": 1000}, "at most 512 layers"),
    "a negative norm epsilon": ({"rms_norm_eps": -1.0}, "sets rms_norm_eps to -1.0"),
    "a context of 0": ({"max_position_embeddings": 0}, "sets max_position_embeddings to 0"),
    "a size that is not a number": ({"hidden_size": "128"}, "sets hidden_size to '128'"),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_config_that_lies_about_the_tensors_is_refused(lie, ckpt, tmp_path):
    config, message = LIES[lie]
    src = lying(ckpt, tmp_path, **config)
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError) as e:
        convert(src, out)
    assert message in str(e.value) and "hint:" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lying"]  # no output, no temporary


def test_a_missing_embedding_is_refused(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "no-embd"
    shutil.copytree(ckpt, src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'token_embd\.weight' not found"):
        convert(src, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_the_cli_says_one_line_for_a_negative_size(ckpt, tmp_path):
    src = lying(ckpt, tmp_path, hidden_size=-128)
    proc = run_pymoe("convert", str(src), "-o", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "struct.error" not in proc.stderr
    assert "hidden_size to -128" in proc.stderr


def test_a_tensor_whose_bytes_do_not_fit_its_shape_is_refused(ckpt, tmp_path):
    src = tmp_path / "bad-header"
    shutil.copytree(ckpt, src)
    path = src / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] // 2]  # the byte range still holds all of it
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: the offsets stay valid
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(ValueError, match=f"tensor '{name}' holds 512 bytes, but F32 values of shape \\[64\\] take 256"):
        convert(src, tmp_path / "out.gguf")


def test_a_config_that_tells_the_truth_still_converts(ckpt, tmp_path):
    r = convert(ckpt, tmp_path / "ok.gguf", lo_type=None)
    assert r.output.is_file() and r.output_bytes == r.output.stat().st_size


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_named():
    w = gguf.GGUFWriter(None, "llama")
    stream = GGUFStream(Path("/dev/full"), w, [("t.weight", (4, 1 << 16), "f32", 4 << 18)])
    try:
        with pytest.raises(OSError, match="the disk is full") as e:
            stream.open()  # the header may already not fit
            stream.write(np.zeros((4, 1 << 16), np.float32))
        assert e.value.errno == errno.ENOSPC and "hint:" in str(e.value)
    finally:
        stream.release()
