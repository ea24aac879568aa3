#!/usr/bin/env python3
"""Synthetic MoE models for benchmarks: random quantised weights with the
exact tensor shapes of a real model, written as GGUF directly.

The weights mean nothing (the router is random too; the replay mode of
`pymoe.Model` gives such a model a real model's routing), but every tensor has
the name, shape and quant type llama.cpp expects, so loading, memory traffic
and compute are those of the real model. Presets:

- mixtral-8x7b, qwen3-30b-a3b: the real dimensions (~25 GiB and ~17 GiB at
  q4_K experts; need that much disk);
- mixtral-mini (~1.2 GiB) and mixtral-small (~3 GiB): Mixtral's routing
  shape (8 experts, top-2) scaled down to fit a small machine;
- qwen3-mini, and tiny / qwen3-tiny for tests.

Writing is fast: per (quant type, row length) a pool of random rows is
quantised once with ggml's own quantiser (`pymoe._core.quantize`: valid
blocks, no NaNs) and every tensor is filled with rows drawn at random from it.
`--sidecar q2_K` also writes MODEL.lo.gguf, the low-precision expert sidecar
of pymoe's mixed precision: the same rows quantised to q2_K from the same
float values, bound to the model as `pymoe convert` binds one.

    python tools/make_synthetic_moe.py mixtral-mini                 # -> ~/.cache/pymoe/bench/
    python tools/make_synthetic_moe.py qwen3-30b-a3b --dry-run      # sizes only
    python tools/make_synthetic_moe.py mixtral-8x7b --sidecar q2_K -o M.gguf   # M.gguf + M.lo.gguf
    python tools/make_synthetic_moe.py --list
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pymoe._units import format_bytes
from pymoe.sidecar import default_sidecar_path

POOL_ROWS = 256  # distinct quantised rows per (type, row length)


@dataclass(frozen=True)
class Preset:
    arch: str  # llama.cpp architecture ("llama" with experts is Mixtral)
    n_embd: int
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int  # rows of one expert's gate/up (the expert's hidden size)
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int = 4096
    n_ff: int = 0  # the dense FFN size some archs record (qwen3moe); 0: n_ff_exp
    rope_base: float = 1e6
    rms_eps: float = 1e-5
    expert_type: str = "q4_K"
    other_type: str = "q8_0"
    note: str = ""


PRESETS: dict[str, Preset] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json
    "mixtral-8x7b": Preset(
        "llama", 4096, 32, 8, 2, 14336, 32, 8, 128, 32000, n_ctx=32768, note="Mixtral-8x7B, real dimensions"
    ),
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3-30b-a3b": Preset(
        "qwen3moe",
        2048,
        48,
        128,
        8,
        768,
        32,
        4,
        128,
        151936,
        n_ctx=40960,
        n_ff=6144,
        rms_eps=1e-6,
        note="Qwen3-30B-A3B, real dimensions",
    ),
    "mixtral-mini": Preset(
        "llama",
        1024,
        16,
        8,
        2,
        2816,
        16,
        4,
        64,
        32000,
        expert_type="q8_0",
        note="Mixtral routing shape scaled down (docs/benchmarks.md's model)",
    ),
    "mixtral-small": Preset(
        "llama", 2048, 20, 8, 2, 5632, 16, 4, 128, 32000, note="Mixtral routing shape scaled down, ~3 GiB"
    ),
    "qwen3-mini": Preset(
        "qwen3moe",
        768,
        16,
        128,
        8,
        256,
        12,
        4,
        64,
        32000,
        n_ff=3072,
        rms_eps=1e-6,
        expert_type="q8_0",
        note="Qwen3-MoE routing shape (128 experts, top-8) scaled down",
    ),
    "tiny": Preset("llama", 256, 2, 8, 2, 512, 4, 2, 64, 512, n_ctx=512, expert_type="q8_0", note="for tests"),
    "qwen3-tiny": Preset(
        "qwen3moe", 256, 2, 16, 4, 256, 4, 2, 64, 512, n_ctx=512, n_ff=512, expert_type="q8_0", note="for tests"
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type: str  # a pymoe._core quant type name ("q8_0", "q4_K", "f32" ...)
    is_expert: bool

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    def nbytes(self) -> int:
        from pymoe import _core

        return _core.row_size(self.type, self.shape[0]) * self.n_rows


def tensor_specs(p: Preset) -> list[TensorSpec]:
    """Every tensor of the model, in file order (layer by layer, as llama.cpp's converter writes)."""
    q_dim, kv_dim = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    w, x = p.other_type, p.expert_type
    specs = [TensorSpec("token_embd.weight", (p.n_embd, p.n_vocab), w, False)]
    for il in range(p.n_layer):
        b = f"blk.{il}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (p.n_embd,), "f32", False),
            TensorSpec(b + "attn_q.weight", (p.n_embd, q_dim), w, False),
            TensorSpec(b + "attn_k.weight", (p.n_embd, kv_dim), w, False),
            TensorSpec(b + "attn_v.weight", (p.n_embd, kv_dim), w, False),
            TensorSpec(b + "attn_output.weight", (q_dim, p.n_embd), w, False),
        ]
        if p.arch == "qwen3moe":
            specs += [
                TensorSpec(b + "attn_q_norm.weight", (p.head_dim,), "f32", False),
                TensorSpec(b + "attn_k_norm.weight", (p.head_dim,), "f32", False),
            ]
        specs += [
            TensorSpec(b + "ffn_norm.weight", (p.n_embd,), "f32", False),
            TensorSpec(b + "ffn_gate_inp.weight", (p.n_embd, p.n_expert), "f32", False),
            TensorSpec(b + "ffn_gate_exps.weight", (p.n_embd, p.n_ff_exp, p.n_expert), x, True),
            TensorSpec(b + "ffn_down_exps.weight", (p.n_ff_exp, p.n_embd, p.n_expert), x, True),
            TensorSpec(b + "ffn_up_exps.weight", (p.n_embd, p.n_ff_exp, p.n_expert), x, True),
        ]
    specs += [
        TensorSpec("output_norm.weight", (p.n_embd,), "f32", False),
        TensorSpec("output.weight", (p.n_embd, p.n_vocab), w, False),
    ]
    return specs


def check_types(p: Preset) -> None:
    """Every quantised row length must be a whole number of the type's blocks."""
    from pymoe import _core

    for t in tensor_specs(p):
        block = int(_core.type_info(t.type)["block_size"])
        if t.shape[0] % block:
            raise ValueError(
                f"{t.name}: rows of {t.shape[0]} values do not fit {t.type} blocks of {block}; "
                "hint: choose another --type / --other-type"
            )


@dataclass
class SizeReport:
    expert_bytes: int
    other_bytes: int
    bytes_per_expert: int  # one (layer, expert) pair: what a cache miss reads
    n_tensors: int

    @property
    def total(self) -> int:
        return self.expert_bytes + self.other_bytes


def sizes(p: Preset) -> SizeReport:
    specs = tensor_specs(p)
    expert = sum(t.nbytes() for t in specs if t.is_expert)
    other = sum(t.nbytes() for t in specs if not t.is_expert)
    return SizeReport(expert, other, expert // (p.n_layer * p.n_expert), len(specs))


def resolve(name: str, expert_type: str | None = None, other_type: str | None = None) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; hint: one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    if expert_type:
        p = replace(p, expert_type=expert_type)
    if other_type:
        p = replace(p, other_type=other_type)
    check_types(p)
    return p


def default_output(name: str, p: Preset) -> Path:
    root = Path(os.environ.get("PYMOE_CACHE_DIR", Path.home() / ".cache" / "pymoe")) / "bench"
    return root / f"synthetic-{name}-{p.expert_type}.gguf"


# --------------------------------------------------------------------- writing


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """The simplest vocabulary llama.cpp's SentencePiece tokenizer accepts:
    <unk>, <s>, </s>, the 256 byte tokens, then filler pieces."""
    if n_vocab < 3 + 256 + 1:
        raise ValueError(f"a vocabulary needs at least 260 tokens, the preset has {n_vocab}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, BYTE (gguf.TokenType)
    tokens += [f"\u2581t{i}" for i in range(n_vocab - len(tokens))]
    types += [1] * (n_vocab - len(types))  # NORMAL
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(n_vocab - 259)]
    return tokens, scores, types


class RowPools:
    """Per (type, row length): POOL_ROWS rows of N(0, 1/row_length) values
    quantised once by ggml; tensors are filled with rows drawn from the pool.
    The values are kept, so that the same rows can be quantised to a second
    type (`low_pool`: a sidecar's copy of the very rows the main file holds)."""

    def __init__(self, rng: np.random.Generator, n_threads: int = 0) -> None:
        self.rng = rng
        self.n_threads = n_threads
        self.values: dict[tuple[str, int], np.ndarray] = {}
        self.pools: dict[tuple[str, int], np.ndarray] = {}
        self.low_pools: dict[tuple[str, int, str], np.ndarray] = {}

    def pool(self, qtype: str, n: int) -> np.ndarray:
        from pymoe import _core

        key = (qtype, n)
        if key not in self.pools:
            values = self.rng.standard_normal((POOL_ROWS, n), dtype=np.float32) * np.float32(1.0 / np.sqrt(n))
            self.values[key] = values.astype(np.float32)
            self.pools[key] = _core.quantize(self.values[key], qtype, self.n_threads)
        return self.pools[key]

    def low_pool(self, qtype: str, n: int, low_type: str) -> np.ndarray:
        """The values of pool (qtype, n) quantised to `low_type` (the pool must exist)."""
        from pymoe import _core

        key = (qtype, n, low_type)
        if key not in self.low_pools:
            self.low_pools[key] = _core.quantize(self.values[(qtype, n)], low_type, self.n_threads)
        return self.low_pools[key]

    def draw(self, t: TensorSpec) -> np.ndarray:
        """Which pool row each of the tensor's rows is (uint8: POOL_ROWS <= 256). The pool is made first:
        the random numbers are drawn in the tool's fixed order, so a seed's bytes stay what they were."""
        self.pool(t.type, t.shape[0])
        return self.rng.integers(0, POOL_ROWS, t.n_rows).astype(np.uint8)

    def fill(self, t: TensorSpec, idx: np.ndarray | None = None, low_type: str | None = None) -> np.ndarray:
        """The tensor's bytes, numpy shape [..., rows, row_bytes] (ggml order reversed): rows `idx`
        (default: drawn now) of its pool, or with `low_type` of that pool quantised to `low_type`."""
        pool = self.pool(t.type, t.shape[0])
        if low_type is not None:
            pool = self.low_pool(t.type, t.shape[0], low_type)
        if idx is None:
            idx = self.draw(t)
        return pool[idx].reshape(*reversed(t.shape[1:]), pool.shape[1])


def _float_tensor(t: TensorSpec, rng: np.random.Generator, router_scale: float = 1.0) -> np.ndarray:
    shape = tuple(reversed(t.shape))
    if t.name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    # the router: logits of scale `router_scale` (about 1 for a unit-RMS hidden state), so that the
    # routing varies per token; the larger, the more one expert of a token's top-k outweighs the others
    scale = np.float32(router_scale / np.sqrt(t.shape[0]))
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)


_FILE_TYPES = {"q8_0": "MOSTLY_Q8_0", "q4_K": "MOSTLY_Q4_K_M", "q4_0": "MOSTLY_Q4_0", "q6_K": "MOSTLY_Q6_K"}


def _metadata(writer, name: str, p: Preset, seed: int, router_scale: float = 1.0) -> None:
    import gguf

    writer.add_name(f"synthetic {name} (random weights, pymoe benchmark)")
    writer.add_context_length(p.n_ctx)
    writer.add_embedding_length(p.n_embd)
    writer.add_block_count(p.n_layer)
    writer.add_feed_forward_length(p.n_ff or p.n_ff_exp)
    writer.add_head_count(p.n_head)
    writer.add_head_count_kv(p.n_head_kv)
    writer.add_rope_dimension_count(p.head_dim)
    writer.add_rope_freq_base(p.rope_base)
    writer.add_layer_norm_rms_eps(p.rms_eps)
    writer.add_expert_count(p.n_expert)
    writer.add_expert_used_count(p.n_expert_used)
    writer.add_vocab_size(p.n_vocab)
    if p.arch == "qwen3moe":
        writer.add_expert_feed_forward_length(p.n_ff_exp)
        writer.add_key_length(p.head_dim)
        writer.add_value_length(p.head_dim)
    if p.expert_type in _FILE_TYPES:
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[p.expert_type]])
    tokens, scores, types = _vocab(p.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_string("pymoe.synthetic.preset", name)
    writer.add_uint32("pymoe.synthetic.seed", seed)
    writer.add_string("pymoe.synthetic.expert_type", p.expert_type)
    writer.add_float32("pymoe.synthetic.router_scale", router_scale)


def _tensors(
    p: Preset, seed: int, n_threads: int, router_scale: float, pools: RowPools | None = None
) -> Iterator[tuple[TensorSpec, np.ndarray, np.ndarray | None]]:
    """(spec, bytes, the pool rows drawn: None for float tensors) of every tensor, in file order."""
    pools = pools or RowPools(np.random.default_rng(seed), n_threads)
    rng = pools.rng
    for t in tensor_specs(p):
        if t.type == "f32":
            yield t, _float_tensor(t, rng, router_scale), None
        else:
            idx = pools.draw(t)
            yield t, pools.fill(t, idx), idx


def _add_tensor_infos(writer, specs: list[TensorSpec]) -> None:
    import gguf

    for t in specs:
        if t.type == "f32":
            writer.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes())
        else:
            byte_shape = (*reversed(t.shape[1:]), t.nbytes() // t.n_rows)
            qtype = gguf.GGMLQuantizationType[t.type.upper()]
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes(), raw_dtype=qtype)


def sidecar_specs(p: Preset, lo_type: str) -> list[TensorSpec]:
    """The sidecar's tensors: every expert weight under its own name and shape, in `lo_type` or, where
    the row length does not fit its blocks, the fallback `pymoe convert` would use."""
    from pymoe.convert import qtypes

    lo_type = qtypes.parse_type(lo_type, "--sidecar")
    return [replace(t, type=qtypes.fit_type(lo_type, t.shape[0]).type) for t in tensor_specs(p) if t.is_expert]


def write_model(
    name: str,
    out: str | os.PathLike[str],
    *,
    expert_type: str | None = None,
    other_type: str | None = None,
    seed: int = 0,
    force: bool = False,
    n_threads: int = 0,
    progress: bool = False,
    router_scale: float = 1.0,
    sidecar: str | None = None,
    sidecar_out: str | os.PathLike[str] | None = None,
) -> Path:
    """Writes the preset's synthetic GGUF to `out` (atomically) and returns the path. `router_scale`
    multiplies the routers' logits (see --router-scale). With `sidecar` (a low type such as "q2_K")
    it also writes the low-precision expert sidecar `sidecar_out` (default: OUT.lo.gguf), bound to the
    main file as `pymoe convert` binds one: each expert row is the same pool row as in the main file,
    quantised to the low type from the same float values (as a sidecar made from a checkpoint is).
    Both are complete before either is renamed into place."""
    import gguf

    from pymoe import sidecar as sc
    from pymoe._atomic import atomic_output

    p = resolve(name, expert_type, other_type)
    out = Path(out)
    specs = tensor_specs(p)
    lo_specs: list[TensorSpec] = []
    if sidecar:
        from pymoe.convert import qtypes

        sidecar = qtypes.parse_type(sidecar, "--sidecar")
        lo_specs = sidecar_specs(p, sidecar)
        sidecar_out = Path(sidecar_out) if sidecar_out else sc.default_sidecar_path(out)
        if sidecar_out.absolute() == out.absolute():
            raise ValueError(f"the sidecar would overwrite the model '{out}'; hint: give it another path")
    pools = RowPools(np.random.default_rng(seed), n_threads)
    expert_rows: dict[str, np.ndarray] = {}  # the main file's pool rows of each expert tensor (sidecar only)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(out, force=force))
        if sidecar:
            side_tmp = stack.enter_context(atomic_output(sidecar_out, inputs=(out,), force=force))
        writer = gguf.GGUFWriter(tmp, p.arch)
        _metadata(writer, name, p, seed, router_scale)
        _add_tensor_infos(writer, specs)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (t, data, idx) in enumerate(_tensors(p, seed, n_threads, router_scale, pools)):
            assert data.nbytes == t.nbytes(), t.name
            writer.write_tensor_data(data)
            if sidecar and t.is_expert:
                expert_rows[t.name] = idx
            if progress and (t.is_expert or i == len(specs) - 1):
                print(f"\r  {i + 1}/{len(specs)} tensors", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        writer.close()
        if sidecar:
            _write_sidecar(side_tmp, tmp, out.name, p, sidecar, lo_specs, pools, expert_rows, progress)
    return out


def _write_sidecar(
    path: Path,
    main: Path,
    main_name: str,
    p: Preset,
    lo_type: str,
    lo_specs: list[TensorSpec],
    pools: RowPools,
    expert_rows: dict[str, np.ndarray],
    progress: bool,
) -> None:
    from pymoe import sidecar as sc
    from pymoe.convert.pipeline import _sidecar_writer

    meta = {
        f"{p.arch}.block_count": p.n_layer,
        f"{p.arch}.expert_count": p.n_expert,
        f"{p.arch}.expert_used_count": p.n_expert_used,
    }
    writer = _sidecar_writer(p.arch, meta, lo_type, p.n_expert, sc.fingerprint(main), main_name)
    _add_tensor_infos(writer, lo_specs)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, t in enumerate(lo_specs):
        main_type = p.expert_type
        data = pools.fill(replace(t, type=main_type), expert_rows[t.name], low_type=t.type)
        assert data.nbytes == t.nbytes(), t.name
        writer.write_tensor_data(data)
        if progress:
            print(f"\r  sidecar {i + 1}/{len(lo_specs)} tensors", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    writer.close()


# --------------------------------------------------------------------- command line


def describe(name: str, p: Preset) -> str:
    s = sizes(p)
    return (
        f"{name}: {p.arch}, hidden {p.n_embd}, {p.n_layer} layers, {p.n_expert} experts top-{p.n_expert_used}, "
        f"expert ff {p.n_ff_exp}, {p.n_head}/{p.n_head_kv} heads x {p.head_dim}, vocab {p.n_vocab}; "
        f"experts {p.expert_type}, other {p.other_type}: {format_bytes(s.total)} "
        f"(experts {format_bytes(s.expert_bytes)} = {s.expert_bytes / s.total:.1%}, "
        f"{format_bytes(s.bytes_per_expert)} per expert)"
    )


def setup_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("preset", nargs="?", help="one of: " + ", ".join(PRESETS))
    ap.add_argument("-o", "--outfile", help="output GGUF (default: ~/.cache/pymoe/bench/synthetic-PRESET-TYPE.gguf)")
    ap.add_argument("--type", dest="expert_type", help="quant type of the expert weights (preset default)")
    ap.add_argument("--other-type", help="quant type of the other matrices (default q8_0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--router-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="scale of the routers' logits (default 1); with 2, unit-normal logits give top-2 gate weights like\n"
        "the Mixtral-8x7B decode trace's (second weight below 0.05/0.1/0.2 for 6/14/32%% of tokens; the trace:\n"
        "4/11/31%%)",
    )
    ap.add_argument(
        "--sidecar",
        metavar="TYPE",
        help="also write OUT.lo.gguf, a low-precision expert sidecar (e.g. q2_K, q3_K) bound to the model as\n"
        "`pymoe convert` binds one: the same rows as the model's experts, quantised to TYPE",
    )
    ap.add_argument("--threads", type=int, default=0, help="quantiser threads (0: all)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    ap.add_argument("--dry-run", action="store_true", help="print the shapes and sizes, write nothing")
    ap.add_argument("--list", action="store_true", help="list the presets")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.list or not args.preset:
        for name in PRESETS:
            print(describe(name, PRESETS[name]) + f"  [{PRESETS[name].note}]")
        return 0
    try:
        p = resolve(args.preset, args.expert_type, args.other_type)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.outfile) if args.outfile else default_output(args.preset, p)
    print(describe(args.preset, p))
    need = sizes(p).total
    if args.sidecar:
        try:
            need += sum(t.nbytes() for t in sidecar_specs(p, args.sidecar))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"sidecar {args.sidecar}: {format_bytes(need - sizes(p).total)}")
    if args.dry_run:
        print(f"would write {need} bytes to {out}" + (f" and {default_sidecar_path(out)}" if args.sidecar else ""))
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(out.parent)
    if need > st.f_bavail * st.f_frsize:
        print(
            f"error: {out.parent} has {format_bytes(st.f_bavail * st.f_frsize)} free, "
            f"{'the model and its sidecar need' if args.sidecar else 'the model needs'} {format_bytes(need)}; "
            "hint: pass -o on a larger disk, or use a scaled-down preset",
            file=sys.stderr,
        )
        return 1
    t0 = time.perf_counter()
    try:
        write_model(
            args.preset,
            out,
            expert_type=args.expert_type,
            other_type=args.other_type,
            seed=args.seed,
            force=args.force,
            n_threads=args.threads,
            progress=True,
            router_scale=args.router_scale,
            sidecar=args.sidecar,
        )
    except (FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dt = time.perf_counter() - t0
    size = out.stat().st_size
    written = [f"{out} ({format_bytes(size)})"]
    if args.sidecar:
        side = default_sidecar_path(out)
        size += side.stat().st_size
        written.append(f"{side} ({format_bytes(side.stat().st_size)})")
    print(f"wrote {' and '.join(written)} in {dt:.1f} s ({size / dt / 1e6:.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
