"""pymoe: run Mixture-of-Experts language models bigger than your fast memory.

llama.cpp (pinned, patched, linked into ``pymoe._core``) driven from Python.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    from . import _core
except ImportError as e:  # a source checkout shadowing the installed package
    raise ImportError(
        f"pymoe's native extension (_core) is not importable from {Path(__file__).parent}: {e}. "
        "hint: if this is the source folder, run from another folder (or use `pytest`, not `python -m pytest`, "
        "which puts the current folder first on sys.path), or install in editable mode: "
        "pip install --no-build-isolation -e ."
    ) from e
from .conversation import Conversation
from .gguf_info import GGUFSummary, summarize
from .model import GenerationStats, Model, SamplingParams
from .perplexity import LogitsReference, PerplexityResult, ReferenceComparison
from .settings import Settings

try:
    __version__ = version("pymoe")
except PackageNotFoundError:  # running from a source tree without metadata
    __version__ = "0.0.0"

llama_cpp_commit = _core.llama_commit()

__all__ = [
    "Conversation",
    "GGUFSummary",
    "GenerationStats",
    "LogitsReference",
    "Model",
    "PerplexityResult",
    "ReferenceComparison",
    "SamplingParams",
    "Settings",
    "__version__",
    "llama_cpp_commit",
    "summarize",
]
