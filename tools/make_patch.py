#!/usr/bin/env python3
"""Regenerate one of native/patches/NNNN-*.patch from edits made in third_party/llama.cpp.

    python tools/make_patch.py native/patches/0001-ggml-mul-mat-id-skip.patch [--files F ...]

With --files, only those files' diffs are regenerated; the patch's other diffs stay as they are
(use that when a later patch changes another file of this one).

The patch's base is the pristine tree plus the patches numbered before it, so
patches that touch the same file stay independent and apply in order. The
patch keeps its header (the text before the first `diff --git`: why the patch
exists); the files come from --files (paths inside llama.cpp) or, for an
existing patch, from its own diff headers.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "third_party" / "llama.cpp"


def load_fetch_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_llama_cpp", ROOT / "tools" / "fetch_llama_cpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("patch", type=Path)
    ap.add_argument("--files", nargs="*", default=None, help="paths inside llama.cpp that this patch changes")
    args = ap.parse_args()

    patch = args.patch.resolve()
    text = patch.read_text() if patch.exists() else ""
    header = text.split("diff --git", 1)[0] if text else ""
    if not header.strip():
        print(f"{patch.name}: write a header first (why this patch exists), then run again", file=sys.stderr)
        return 1
    # the patch's current diffs, by file: with --files only those are regenerated, the others kept
    kept = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^diff --git a/(\S+) b/.*?(?=^diff --git |\Z)", text, flags=re.M | re.S)
    }
    files = args.files or sorted(kept)
    if not files:
        print("no files: pass --files", file=sys.stderr)
        return 1

    fetch = load_fetch_tool()
    earlier = [p for p in fetch.patches(patch.parent) if p.name < patch.name]
    for later in (p for p in fetch.patches(patch.parent) if p.name > patch.name):
        shared = set(files) & set(re.findall(r"^diff --git a/(\S+) b/", later.read_text(), flags=re.M))
        if shared:
            # the working tree holds the later patch's edits too; they would be folded into this one
            print(
                f"{', '.join(sorted(shared))} also changed by {later.name}: edit that file's hunks of "
                f"{patch.name} by hand, or regenerate the patches from the last one down",
                file=sys.stderr,
            )
            return 1
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        fetch.extract(fetch.download_sdist(), base)
        fetch.apply_patches(base, earlier)
        for f in files:
            proc = subprocess.run(
                [
                    "git",
                    "diff",
                    "--no-index",
                    "--no-color",
                    "--src-prefix=a/",
                    "--dst-prefix=b/",
                    f"base/{f}",
                    str(TREE / f),
                ],
                cwd=tmp,
                capture_output=True,
                text=True,
            )
            if proc.returncode not in (0, 1):
                print(proc.stderr, file=sys.stderr)
                return 1
            kept[f] = proc.stdout.replace(f"a/base/{f}", f"a/{f}").replace(f"b{TREE}/{f}", f"b/{f}")
    patch.write_text(header + "".join(d for d in kept.values() if d))
    print(f"{patch.name}: {len(files)} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
