"""`pymoe convert`: a Hugging Face MoE checkpoint (a folder or a hub repo id)
to a GGUF that llama.cpp runs, experts in --expert-type and the rest in
--outtype, plus a sidecar GGUF with every expert again in the low-precision
--lo-type for pymoe's mixed-precision expert cache. Given an existing .gguf,
it builds only the sidecar (the experts dequantised and quantised again)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .._units import format_bytes
from ..gguf_info import GGUF_MAGIC

EPILOG = """examples:
  pymoe convert ./Qwen3-30B-A3B -o qwen3.gguf                writes qwen3.gguf and qwen3.lo.gguf
  pymoe convert mistralai/Mixtral-8x7B-v0.1 -o mixtral.gguf  fetches config, tokenizer and safetensors
  pymoe convert model-Q4_K_M.gguf                            only the sidecar: model-Q4_K_M.lo.gguf
types: f32 f16 bf16 q8_0 q6_K q5_K q5_0 q4_K q4_0 iq4_nl q3_K q2_K ... (any case; see --list-types)"""


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe convert")
    parser.description = __doc__
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "source", nargs="?", help="Hugging Face model folder, hub repo id (owner/name), or a .gguf (sidecar only)"
    )
    parser.add_argument("-o", "--outfile", metavar="OUT", help="output GGUF (default: ./<model name>.gguf)")
    parser.add_argument(
        "--outtype", default="q8_0", metavar="TYPE", help="type of the non-expert weights (default: q8_0)"
    )
    parser.add_argument("--expert-type", default="q4_K", metavar="TYPE", help="type of the experts (default: q4_K)")
    parser.add_argument(
        "--lo-type", default="q2_K", metavar="TYPE", help="type of the experts' low-precision copy (default: q2_K)"
    )
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--sidecar", metavar="PATH", help="the sidecar's path (default: OUT with .lo.gguf)")
    side.add_argument("--no-sidecar", action="store_true", help="write only the main GGUF")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument("-t", "--threads", type=int, default=0, metavar="N", help="quantisation threads (default: all)")
    parser.add_argument(
        "--pre-tokenizer",
        metavar="NAME",
        help="llama.cpp's name for the BPE pre-tokenizer, when pymoe does not recognise it (e.g. llama-bpe, qwen2)",
    )
    hub = parser.add_argument_group("Hugging Face hub")
    hub.add_argument("--revision", metavar="REV", help="branch, tag or commit of the hub repo")
    hub.add_argument(
        "--local-dir", metavar="DIR", help="download into DIR (and find an earlier download there) instead of the cache"
    )
    parser.add_argument("--list-types", action="store_true", help="list the types ggml quantises to and exit")
    parser.add_argument("--verbose", action="store_true", help="more detail and full error tracebacks")
    return parser


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


class _Bars:
    """Two progress bars on stderr: tensors done, and values quantised."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.tensors: Any = None
        self.values: Any = None

    def __call__(self, ev: Any) -> None:
        if self.tensors is None:
            self.tensors = self.tqdm(total=ev.n_tensors, desc="tensors   ", unit="tensor", disable=None, position=0)
            self.values = self.tqdm(
                total=ev.bytes_total, desc="quantising", unit="B", unit_scale=True, disable=None, position=1
            )
        self.values.update(ev.bytes_done - self.values.n)
        if ev.tensor_done:
            self.tensors.update(1)
            self.tensors.set_postfix_str(ev.tensor, refresh=False)

    def close(self) -> None:
        for bar in (self.values, self.tensors):
            if bar is not None:
                bar.close()


def _report(result: Any, *, sidecar_only: bool) -> None:
    by_type: dict[str, int] = {}
    for t in result.tensors:
        key = t.lo_type if sidecar_only else t.type
        by_type[key] = by_type.get(key, 0) + 1
    types = ", ".join(f"{n} {k}" for k, n in sorted(by_type.items()))
    if not sidecar_only:
        print(f"wrote {result.output} ({format_bytes(result.output_bytes)}): {len(result.tensors)} tensors ({types})")
    if result.sidecar is not None:
        n = sum(1 for t in result.tensors if t.lo_type)
        lo = sorted({t.lo_type for t in result.tensors if t.lo_type})
        print(f"wrote {result.sidecar} ({format_bytes(result.sidecar_bytes)}): {n} expert tensors ({', '.join(lo)})")
    fallbacks = result.fallbacks
    if fallbacks:
        print(
            f"{len(fallbacks)} tensor(s) got a fallback type because their row length is not a multiple of the "
            "type's block (as llama-quantize does):"
        )
        for name, wanted, got in fallbacks[:8]:
            print(f"  {name}: {wanted} -> {got}")
        if len(fallbacks) > 8:
            print(f"  … and {len(fallbacks) - 8} more")
    if result.skipped:
        print(f"skipped {len(result.skipped)} checkpoint tensor(s) llama.cpp does not use, e.g. {result.skipped[0]}")
    print(f"took {result.seconds:.1f} s")


def main(args: argparse.Namespace) -> int:
    from . import build_sidecar, convert
    from .qtypes import quant_types

    if args.list_types:
        print(" ".join(quant_types()))
        return 0
    if not args.source:
        raise ValueError("give a model folder, a hub repo id or a .gguf; see `pymoe convert --help`")
    if args.threads < 0:
        raise ValueError("--threads must be >= 0")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="pymoe convert: %(message)s")
    source = Path(args.source).expanduser()
    sidecar_only = _is_gguf(source)
    if sidecar_only and args.outfile:
        raise ValueError(f"'{source}' is already a GGUF: only its sidecar is built; name it with --sidecar, not -o")
    if sidecar_only and args.no_sidecar:
        raise ValueError(f"'{source}' is a GGUF and --no-sidecar leaves nothing to do")
    bars = _Bars()
    try:
        if sidecar_only:
            result = build_sidecar(
                source, args.sidecar, lo_type=args.lo_type, force=args.force, n_threads=args.threads, progress=bars
            )
        else:
            out = Path(args.outfile) if args.outfile else Path(f"{str(args.source).rstrip('/').split('/')[-1]}.gguf")
            result = convert(
                args.source,
                out,
                outtype=args.outtype,
                expert_type=args.expert_type,
                lo_type=None if args.no_sidecar else args.lo_type,
                sidecar=args.sidecar,
                force=args.force,
                n_threads=args.threads,
                pre_tokenizer=args.pre_tokenizer,
                revision=args.revision,
                local_dir=args.local_dir,
                progress=bars,
                download_tqdm=None if sys.stderr.isatty() else _silent_tqdm(),
            )
    finally:
        bars.close()
    _report(result, sidecar_only=sidecar_only)
    return 0


def _silent_tqdm() -> Any:
    """huggingface-hub's bars, switched off when stderr is not a terminal."""
    from tqdm.auto import tqdm

    class Silent(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            kw["disable"] = True
            super().__init__(*a, **kw)

    return Silent
