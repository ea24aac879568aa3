"""`--stats` and `--stats-json FILE` of the verbs that run a model: the summary
people read (pymoe.stats) on stderr, or the raw counters as JSON in a file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import stats
from ._atomic import atomic_output, check_output_path

if TYPE_CHECKING:
    from .model import Model

VIEWS = ("summary", "layers")


def add_stats_args(parser: argparse.ArgumentParser, *, when: str = "at the end", json_file: bool = True) -> None:
    # two flags, not one with an optional value: `--stats MODEL` must leave MODEL to the positional
    # (argparse matches an option string with "=" in it whole before it splits one at "=")
    parser.add_argument(
        "--stats",
        action="store_const",
        const="summary",
        default=None,
        help=f"print a short summary {when} to stderr: speed, expert-cache hit rate, bytes moved, where the budget "
        "went",
    )
    parser.add_argument(
        "--stats=layers", dest="stats", action="store_const", const="layers", help="the summary and a line per layer"
    )
    if json_file:
        parser.add_argument(
            "--stats-json",
            metavar="FILE",
            help="write the raw counters (the generation's and the expert engine's, Model.offload_stats()) to FILE "
            "as JSON (overwritten)",
        )


def check_stats_args(args: argparse.Namespace) -> None:
    """Before the model loads: FILE of --stats-json can be written."""
    if getattr(args, "stats_json", None):
        check_output_path(Path(args.stats_json), force=True)


def stats_text(model: Model, generation: dict[str, Any] | None, view: str = "summary") -> str:
    """The summary of `model`'s counters (and of `generation`), with a line per layer for view 'layers'."""
    offload = model.offload_stats()
    text = stats.summary(offload, generation)
    if view == "layers":
        if offload is None:
            return text + "\n(no per-layer counters: the expert offload is off)"
        text += "\n" + stats.layers(model.offload_stats(raw=True), stats.tokens_counted(offload))
    return text


def report_stats(args: argparse.Namespace, model: Model, generation: dict[str, Any] | None = None) -> None:
    """What --stats and --stats-json ask for: the summary on stderr, the raw counters in FILE
    ({"generation": ..., "offload": Model.offload_stats()}, "generation" only where there is one)."""
    if args.stats:
        print(stats_text(model, generation, args.stats), file=sys.stderr)
    if getattr(args, "stats_json", None):
        raw = ({"generation": generation} if generation is not None else {}) | {"offload": model.offload_stats()}
        with atomic_output(args.stats_json, force=True) as tmp:
            tmp.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
