"""The `pymoe` command: dispatches to one module per verb, imported lazily so
that `pymoe --help` and `pymoe info` start fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import NoReturn

from ._args import CliError

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("pymoe.chat", "chat with a model in the terminal (the demo model when none is given)"),
    "generate": ("pymoe.generate", "continue a prompt and print the text"),
    "info": ("pymoe.info", "architecture, experts and bytes by quant type of a GGUF file"),
    "eval": ("pymoe.evaluate", "teacher-forced logits of a text or of token ids, saved as .npy"),
    "perplexity": ("pymoe.perplexity", "perplexity on a text file; KL divergence against a saved reference run"),
    "demo": ("pymoe.chat", "chat with the built-in demo MoE (SmolLM2-135M upcycled)"),
    "bench": ("pymoe.bench", "prefill/decode speed and cache counters at one or more expert budgets"),
    "simulate": ("pymoe.simulate", "replay a routing trace through the cache and planner; hit rate, bytes, latency"),
    "convert": ("pymoe.convert.cli", "Hugging Face MoE checkpoint -> GGUF plus a low-precision expert sidecar"),
    "serve": ("pymoe.serve", "OpenAI-compatible HTTP server (chat/completions, streaming, /stats)"),
    "rpc-server": (
        "pymoe.rpc_server",
        "serve this machine's CPU as a ggml RPC device for --rpc (tests, several machines)",
    ),
}
# a module serves its verb with setup_arg_parser() and main(); these verbs share a module
ENTRY_POINTS: dict[str, tuple[str, str]] = {"demo": ("setup_demo_arg_parser", "demo_main")}
DEFAULT_ENTRY = ("setup_arg_parser", "main")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = ArgumentParser(
        prog="pymoe",
        description="Run Mixture-of-Experts GGUF models with llama.cpp.",
        epilog="Run `pymoe COMMAND --help` for the options of a command. Without a command, "
        "`pymoe` chats with the demo model.",
    )
    parser.add_argument("--version", action="version", version=f"pymoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def _verb_parser(name: str) -> argparse.ArgumentParser:
    module, help_text = COMMANDS[name]
    mod = importlib.import_module(module)
    parser = ArgumentParser(prog=f"pymoe {name}", description=help_text)
    getattr(mod, ENTRY_POINTS.get(name, DEFAULT_ENTRY)[0])(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv:
        argv = ["demo"]
    if argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        # argparse prints help/version, or "invalid choice" with the list, and exits
        top.parse_args(argv)
        return 2
    name = argv[0]
    parser = _verb_parser(name)
    args = parser.parse_args(argv[1:])
    verbose = bool(getattr(args, "verbose", False)) or os.environ.get("PYMOE_DEBUG") == "1"
    run = getattr(importlib.import_module(COMMANDS[name][0]), ENTRY_POINTS.get(name, DEFAULT_ENTRY)[1])
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `pymoe generate ... | head`: the reader went away
        sys.stderr.close()
        return 0
    except (CliError, OSError, ValueError, RuntimeError, ImportError) as e:
        if verbose:
            traceback.print_exc()
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"pymoe {name}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
