"""A converted file runs through llama.cpp's own C API, with no pymoe code in
the way (no pymoe.Model, no hook: `moe_hook` stays NULL, upstream's graph),
and gives the logits pymoe gives, which are transformers' logits.

The C API is called with ctypes on the llama.cpp that pymoe links in. Its
parameter structs are passed by value; their size and the offsets of the
fields set here come from compiling a few lines against the same llama.h."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from hf_models import build_checkpoint, reference_logits

from pymoe import Model, _core
from pymoe.convert import convert

LLAMA = ROOT / "third_party" / "llama.cpp"
FIELDS = (
    "n_ctx",
    "n_batch",
    "n_ubatch",
    "n_threads",
    "n_threads_batch",
    "flash_attn_type",
    "type_k",
    "type_v",
    "moe_hook",
)
LAYOUT_C = (
    '#include <stdio.h>\n#include <stddef.h>\n#include "llama.h"\n'
    "int main(void) {\n"
    '  printf("%zu %zu", sizeof(struct llama_model_params), sizeof(struct llama_context_params));\n'
    + "".join(f'  printf(" %zu", offsetof(struct llama_context_params, {f}));\n' for f in FIELDS)
    + '  printf(" %zu\\n", sizeof(struct llama_batch));\n  return 0;\n}\n'
)
GGML_TYPE_F32 = 0
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0  # as pymoe.Model runs it (the default, auto, picks flash attention)


class LlamaBatch(ctypes.Structure):
    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(ctypes.c_int32)),
        ("embd", ctypes.POINTER(ctypes.c_float)),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


def opaque(size: int) -> type[ctypes.Structure]:
    # a struct of this size and pointer alignment: what the ABI copies for a by-value struct this large
    assert size % 8 == 0 and size > 16
    return type(f"Opaque{size}", (ctypes.Structure,), {"_fields_": [("raw", ctypes.c_uint64 * (size // 8))]})


class LlamaAPI:
    """The few llama.cpp C functions that load a model and return logits."""

    def __init__(self, tmp: Path) -> None:
        if not (LLAMA / "include" / "llama.h").is_file():
            pytest.fail(f"{LLAMA} is missing; run python tools/fetch_llama_cpp.py")
        src = tmp / "layout.c"
        src.write_text(LAYOUT_C)
        exe = tmp / "layout"
        cc = os.environ.get("CC", "cc")
        subprocess.run(
            [cc, "-o", str(exe), str(src), f"-I{LLAMA / 'include'}", f"-I{LLAMA / 'ggml' / 'include'}"], check=True
        )
        sizes = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
        model_size, ctx_size, *offsets, batch_size = sizes
        assert batch_size == ctypes.sizeof(LlamaBatch)
        self.offsets = dict(zip(FIELDS, offsets, strict=True))
        self.ModelParams, self.ContextParams = opaque(model_size), opaque(ctx_size)
        lib = ctypes.CDLL(_core.__file__)
        sig = {
            "llama_backend_init": (None, []),
            "llama_model_default_params": (self.ModelParams, []),
            "llama_context_default_params": (self.ContextParams, []),
            "llama_model_load_from_file": (ctypes.c_void_p, [ctypes.c_char_p, self.ModelParams]),
            "llama_init_from_model": (ctypes.c_void_p, [ctypes.c_void_p, self.ContextParams]),
            "llama_model_get_vocab": (ctypes.c_void_p, [ctypes.c_void_p]),
            "llama_vocab_n_tokens": (ctypes.c_int32, [ctypes.c_void_p]),
            "llama_batch_init": (LlamaBatch, [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]),
            "llama_batch_free": (None, [LlamaBatch]),
            "llama_decode": (ctypes.c_int32, [ctypes.c_void_p, LlamaBatch]),
            "llama_get_logits": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p]),
            "llama_free": (None, [ctypes.c_void_p]),
            "llama_model_free": (None, [ctypes.c_void_p]),
        }
        for name, (restype, argtypes) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.lib = lib
        lib.llama_backend_init()

    def _field(self, params: ctypes.Structure, name: str, ctype: type) -> ctypes._SimpleCData:
        return ctype.from_buffer(params, self.offsets[name])

    def logits(self, path: Path, tokens: list[int]) -> np.ndarray:
        """Teacher-forced logits [n_tokens, n_vocab], f32 KV cache, one batch."""
        lib, n = self.lib, len(tokens)
        model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        assert model, f"llama.cpp could not load {path}"
        cparams = lib.llama_context_default_params()
        assert self._field(cparams, "n_batch", ctypes.c_uint32).value == 2048, "llama.h does not match the library"
        assert self._field(cparams, "moe_hook", ctypes.c_void_p).value is None
        for name, value in (("n_ctx", 256), ("n_batch", 256), ("n_ubatch", 256)):
            self._field(cparams, name, ctypes.c_uint32).value = value
        for name in ("n_threads", "n_threads_batch"):
            self._field(cparams, name, ctypes.c_int32).value = 2
        for name in ("type_k", "type_v"):
            self._field(cparams, name, ctypes.c_int32).value = GGML_TYPE_F32
        self._field(cparams, "flash_attn_type", ctypes.c_int32).value = LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lib.llama_init_from_model(model, cparams)
        assert ctx
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = n
            assert lib.llama_decode(ctx, batch) == 0
            n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
            return np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n, n_vocab)).copy()
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
            lib.llama_model_free(model)


@pytest.fixture(scope="module")
def llama_api(tmp_path_factory: pytest.TempPathFactory) -> LlamaAPI:
    return LlamaAPI(tmp_path_factory.mktemp("llama-api"))


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_plain_llama_cpp_runs_the_converted_file(llama_api, tmp_path, arch):
    ckpt = build_checkpoint(arch, tmp_path / arch, wide=True)
    out = tmp_path / f"{arch}.gguf"
    convert(ckpt, out, outtype="f32", expert_type="f32", lo_type=None)
    tokens = np.random.default_rng(7).integers(0, 384, 40).tolist()
    plain = llama_api.logits(out, tokens)
    with Model(out, cache_type="f32") as m:
        ours = m.logits(tokens)
    np.testing.assert_array_equal(plain, ours)
    ref = reference_logits(ckpt, tokens)
    assert float(np.abs(plain - ref).max() / np.abs(ref).max()) <= 1e-3


def test_plain_llama_cpp_runs_the_q4_k_file(llama_api, tmp_path):
    ckpt = build_checkpoint("qwen3_moe", tmp_path / "q", wide=True)
    out = tmp_path / "q.gguf"
    convert(ckpt, out)  # defaults: q4_K experts, q8_0 rest, q2_K sidecar
    tokens = np.random.default_rng(8).integers(0, 384, 40).tolist()
    with Model(out, cache_type="f32") as m:
        ours = m.logits(tokens)
    np.testing.assert_array_equal(llama_api.logits(out, tokens), ours)
