"""pymoe: run Mixture-of-Experts language models bigger than your fast memory.

llama.cpp (pinned, patched, linked into ``pymoe._core``) driven from Python.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import _core
from .conversation import Conversation
from .gguf_info import GGUFSummary, summarize
from .model import GenerationStats, Model, PerplexityResult, SamplingParams

try:
    __version__ = version("pymoe")
except PackageNotFoundError:  # running from a source tree without metadata
    __version__ = "0.0.0"

llama_cpp_commit = _core.llama_commit()

__all__ = [
    "Conversation",
    "GGUFSummary",
    "GenerationStats",
    "Model",
    "PerplexityResult",
    "SamplingParams",
    "__version__",
    "llama_cpp_commit",
    "summarize",
]
