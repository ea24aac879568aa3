"""`pymoe eval`: teacher-forced logits for every position of a text or of a
list of token ids, saved as a float32 .npy array [n_tokens, n_vocab].

--tokens takes whitespace-separated ids and uses them exactly as given (no
BOS is added), so the result compares token for token with another
implementation; --text is tokenized by the model (with BOS if it wants one)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ._args import add_model_args, load_model
from ._atomic import atomic_output, check_output_path
from ._stats_args import add_stats_args, check_stats_args, report_stats


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe eval")
    parser.description = __doc__
    add_model_args(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="a UTF-8 text file")
    src.add_argument("--tokens", metavar="FILE", help="a file of whitespace-separated token ids")
    parser.add_argument("--logits-out", required=True, metavar="OUT.npy", help="where to save the logits")
    parser.add_argument("--force", action="store_true", help="overwrite OUT.npy if it exists")
    add_stats_args(parser)
    # exact comparisons want an f32 KV cache (f16 adds ~1e-3 relative error)
    parser.set_defaults(cache_type="f32")
    return parser


def read_token_file(path: Path) -> list[int]:
    if not path.is_file():
        raise FileNotFoundError(f"token file '{path}' does not exist")
    words = path.read_text(encoding="utf-8").split()
    try:
        tokens = [int(w) for w in words]
    except ValueError as e:
        raise ValueError(f"'{path}' must hold whitespace-separated integer token ids: {e}") from None
    if not tokens:
        raise ValueError(f"'{path}' holds no token ids")
    return tokens


def main(args: argparse.Namespace) -> int:
    out = Path(args.logits_out)
    check_output_path(out, force=args.force)
    check_stats_args(args)
    tokens: list[int] | None = None
    text = ""
    if args.tokens:
        tokens = read_token_file(Path(args.tokens))
        need = len(tokens)
    else:
        path = Path(args.text)
        if not path.is_file():
            raise FileNotFoundError(f"text file '{path}' does not exist")
        text = path.read_text(encoding="utf-8")
        need = len(text.encode("utf-8")) + 8  # a token covers at least one byte
    # size the context to the input unless the user chose one
    n_ctx = args.n_ctx or max(512, -(-need // 256) * 256)
    with load_model(args, n_ctx=n_ctx) as model:
        ids = tokens if tokens is not None else model.tokenize(text, add_bos=True)
        logits = model.logits(ids)
        with atomic_output(out, force=args.force) as tmp, open(tmp, "wb") as f:
            np.save(f, logits.astype(np.float32, copy=False))
        print(
            json.dumps({"tokens": len(ids), "n_vocab": int(logits.shape[1]), "logits_out": str(out)}), file=sys.stderr
        )
        report_stats(args, model)
    return 0
