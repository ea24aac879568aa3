"""`pymoe perplexity`: perplexity of a model on a text file, measured the way
llama.cpp's llama-perplexity does (chunks of --chunk tokens, each scored on
its second half)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._args import add_model_args, load_model


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe perplexity")
    parser.description = __doc__
    add_model_args(parser)
    parser.add_argument("-f", "--file", required=True, metavar="FILE", help="a UTF-8 text file")
    parser.add_argument("--chunk", type=int, default=512, metavar="N", help="tokens per chunk (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--stats", action="store_true", help="print the expert-offload counters to stderr")
    return parser


def main(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"text file '{path}' does not exist")
    if args.chunk < 2:
        raise ValueError("--chunk must be >= 2")
    text = path.read_text(encoding="utf-8")
    with load_model(args, n_ctx=max(args.n_ctx, args.chunk)) as model:
        tokens = model.tokenize(text, add_bos=False)
        res = model.perplexity(tokens, n_ctx=args.chunk)
        if args.stats:
            print(json.dumps({"offload": model.offload_stats()}, indent=2), file=sys.stderr)
    if args.json:
        print(json.dumps(res.as_dict()))
    else:
        print(
            f"perplexity {res.perplexity:.4f} (nll {res.nll:.4f} +/- {res.nll_stderr:.4f}) "
            f"over {res.n_tokens} scored tokens in {res.n_chunks} chunks of {res.n_ctx}"
        )
    return 0
