"""Command-line options shared by the verbs: loading a model and sampling."""

from __future__ import annotations

import argparse
from typing import Any

from . import settings
from .model import Model
from .settings import budget_arg

__all__ = ["add_model_args", "add_sampling_args", "budget_arg", "load_model", "sampling_from_args"]


def add_model_args(parser: argparse.ArgumentParser, *, model_optional: bool = False) -> None:
    """The model file and a flag for every setting (pymoe.Settings) that has one."""
    if model_optional:
        parser.add_argument("model", nargs="?", default=None, help="GGUF model file (default: the built-in demo model)")
    else:
        parser.add_argument("model", help="GGUF model file")
    settings.add_arguments(parser)


def add_sampling_args(parser: argparse.ArgumentParser, *, temp: float = 0.8) -> None:
    g = parser.add_argument_group("sampling (llama.cpp's sampler chain)")
    g.add_argument(
        "--temp",
        type=float,
        default=temp,
        metavar="T",
        help="temperature; 0 is greedy and deterministic (default: %(default)s)",
    )
    g.add_argument("--top-k", type=int, default=40, metavar="K", help="keep the K most likely tokens; 0: off")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling; 1: off")
    g.add_argument(
        "--min-p", type=float, default=0.05, metavar="P", help="drop tokens below P times the top probability; 0: off"
    )
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R", help="1: off")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed (default: random)")


def load_model(args: argparse.Namespace, **changes: Any) -> Model:
    """The model the command line names, loaded with the settings its flags give (and `changes`)."""
    return Model(args.model, settings.from_args(args, **changes))


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.seed is not None and not 0 <= args.seed < 2**32 - 1:
        raise ValueError("--seed must be in [0, 2**32 - 2]")
    return {
        "temperature": args.temp,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
    }


class CliError(Exception):
    """A user error: printed as one line, exit code 1."""
