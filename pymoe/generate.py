"""`pymoe generate`: continue a prompt and print the text as it is produced.
With --temp 0 the output is deterministic."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._args import add_model_args, add_sampling_args, load_model, sampling_from_args
from ._stats_args import add_stats_args, check_stats_args, report_stats


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe generate")
    parser.description = __doc__
    add_model_args(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", metavar="TEXT", help="the prompt")
    src.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE ('-' for stdin)")
    parser.add_argument(
        "-n",
        "--max-tokens",
        type=int,
        default=128,
        metavar="N",
        help="tokens to generate at most (default: %(default)s)",
    )
    parser.add_argument(
        "--chat", action="store_true", help="treat the prompt as a user message and apply the model's chat template"
    )
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop when TEXT is generated (repeatable)"
    )
    parser.add_argument("--echo", action="store_true", help="print the prompt before the generated text")
    add_stats_args(parser)
    add_sampling_args(parser)
    return parser


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return str(args.prompt)
    if args.file == "-":
        return sys.stdin.read()
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}' does not exist")
    return path.read_text(encoding="utf-8")


def main(args: argparse.Namespace) -> int:
    if args.max_tokens < 0:
        raise ValueError("--max-tokens must be >= 0")
    check_stats_args(args)
    prompt = read_prompt(args)
    sampling = sampling_from_args(args)
    with load_model(args) as model:
        if args.chat:
            stream = model.chat_stream(
                [{"role": "user", "content": prompt}], args.max_tokens, stop=args.stop, **sampling
            )
        else:
            stream = model.stream(prompt, args.max_tokens, stop=args.stop, **sampling)
        if args.echo:
            sys.stdout.write(prompt)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        report_stats(args, model, model.last_stats.as_dict())
    return 0
