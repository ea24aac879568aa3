#!/usr/bin/env python3
"""Materialise the pinned, patched llama.cpp source in third_party/llama.cpp.

The source is the ``vendor/llama.cpp`` folder of the PyPI sdist
``llama-cpp-python==0.3.36`` (upstream llama.cpp commit 0c1e570). The sdist is
fetched with pip into a download cache, checked against the sha256 recorded
here, extracted, and our patches (native/patches/*.patch) are applied in
order.

Idempotent: a stamp file records the sdist hash and the hash of every patch;
when it matches, nothing is done. When a patch changed, the tree is extracted
afresh (never patched twice). The build (CMakeLists.txt) runs this script at
configure time, so `pip install .` needs no manual step.

Environment:
  PYMOE_CACHE_DIR   download cache (default: ~/.cache/pymoe)
  PYMOE_LLAMA_SDIST path of an already downloaded sdist (skips pip)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
UPSTREAM_COMMIT = "0c1e570"
VENDOR_PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / "third_party" / "llama.cpp"
PATCH_DIR = ROOT / "native" / "patches"
STAMP = ".pymoe-stamp.json"


def _load_fetch_module():
    # pymoe/_fetch.py is standalone; load it by path because pymoe itself
    # (and its native extension) is what is being built.
    spec = importlib.util.spec_from_file_location("pymoe_fetch", ROOT / "pymoe" / "_fetch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_fetch = _load_fetch_module()
FetchError = _fetch.FetchError
sha256_of = _fetch.sha256_of


def download_sdist() -> Path:
    return _fetch.pip_download(
        f"{PACKAGE}=={VERSION}", SDIST_NAME, SDIST_SHA256, sdist=True, override_env="PYMOE_LLAMA_SDIST"
    )


def patches(patch_dir: Path) -> list[Path]:
    return sorted(patch_dir.glob("*.patch"))


def wanted_stamp(patch_files: list[Path]) -> dict:
    return {
        "sdist": SDIST_NAME,
        "sdist_sha256": SDIST_SHA256,
        "upstream_commit": UPSTREAM_COMMIT,
        "patches": [[p.name, sha256_of(p)] for p in patch_files],
    }


def read_stamp(dest: Path) -> dict | None:
    try:
        return json.loads((dest / STAMP).read_text())
    except (OSError, ValueError):
        return None


def extract(sdist: Path, into: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(VENDOR_PREFIX):
                continue
            m.name = m.name[len(VENDOR_PREFIX) :]
            if not m.name or m.name == ".git":  # a submodule gitlink pointing outside the sdist
                continue
            members.append(m)
        if not members:
            raise FetchError(f"{sdist}: no {VENDOR_PREFIX} folder inside; hint: delete the file and run again")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(into, members=members, filter="data")
        else:
            tar.extractall(into, members=members)


def run_patch_tool(tree: Path, patch: Path, dry_run: bool) -> subprocess.CompletedProcess:
    if shutil.which("git"):
        # git must not discover the enclosing pymoe checkout, or it would take
        # the patch's paths relative to that repository and skip them.
        env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
        cmd = ["git", "apply", "-p1", "--whitespace=nowarn"] + (["--check"] if dry_run else []) + [str(patch)]
        return subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cmd = ["patch", "-p1", "--forward", "-s"] + (["--dry-run"] if dry_run else [])
    with open(patch, "rb") as f:
        return subprocess.run(cmd, cwd=tree, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def apply_patches(tree: Path, patch_files: list[Path]) -> None:
    for patch in patch_files:
        for dry_run in (True, False):
            proc = run_patch_tool(tree, patch, dry_run)
            if proc.returncode != 0:
                raise FetchError(
                    f"patch {patch.name} does not apply to llama.cpp {UPSTREAM_COMMIT}:\n{proc.stdout.strip()}\n"
                    "hint: regenerate it against a pristine tree (tools/fetch_llama_cpp.py --no-patches --dest DIR)"
                )
        print(f"fetch_llama_cpp: applied {patch.name}", file=sys.stderr)


def refuse_local_edits(dest: Path) -> None:
    """A tree about to be replaced must not hold edits made after it was
    stamped: those are a patch in the making (see tools/make_patch.py)."""
    stamp = dest / STAMP
    if not stamp.is_file():
        return
    stamped = stamp.stat().st_mtime
    for folder, dirs, files in os.walk(dest):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            path = Path(folder) / name
            if path.stat().st_mtime > stamped + 1:
                raise FetchError(
                    f"{dest} has local edits ({path.relative_to(dest)} is newer than the tree's stamp) and would be "
                    "replaced because the patches changed; hint: save the edits as a patch with tools/make_patch.py, "
                    "or pass --force to discard them"
                )


def materialise(dest: Path, force: bool = False, patch_dir: Path | None = PATCH_DIR) -> bool:
    """Make `dest` hold the pinned tree with the patches of `patch_dir` (None:
    pristine). Returns True when it changed anything."""
    patch_files = patches(patch_dir) if patch_dir else []
    want = wanted_stamp(patch_files)
    if not force and read_stamp(dest) == want:
        return False
    if not force:
        refuse_local_edits(dest)
    sdist = download_sdist()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # build beside the destination and swap in at the end: an interrupted run
    # never leaves a half-patched tree that the stamp would call complete.
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        extract(sdist, staging)
        apply_patches(staging, patch_files)
        (staging / STAMP).write_text(json.dumps(want, indent=1) + "\n")
        if dest.exists():
            old = dest.with_name(dest.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"fetch_llama_cpp: llama.cpp {UPSTREAM_COMMIT} ready in {dest}", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where the tree goes (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="extract and patch again even when the stamp matches")
    ap.add_argument("--no-patches", action="store_true", help="pristine upstream tree (for making new patches)")
    ap.add_argument("--patches", type=Path, default=PATCH_DIR, help="folder of *.patch files (default: %(default)s)")
    ap.add_argument("--print-commit", action="store_true", help="print the pinned upstream commit and exit")
    args = ap.parse_args(argv)
    if args.print_commit:
        print(UPSTREAM_COMMIT)
        return 0
    try:
        materialise(
            args.dest.resolve(), force=args.force, patch_dir=None if args.no_patches else args.patches.resolve()
        )
    except FetchError as e:
        print(f"fetch_llama_cpp: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
