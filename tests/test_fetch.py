"""tools/fetch_llama_cpp.py: pinned, verified, patched, idempotent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "tools" / "fetch_llama_cpp.py"


def fetch(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def sdist() -> str:
    # the build has fetched it already; this only finds it in the download cache
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import importlib.util
spec = importlib.util.spec_from_file_location('f', {str(SCRIPT)!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(m.download_sdist())""",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_fresh_tree_then_nothing_to_do(tmp_path, sdist):
    dest = tmp_path / "llama.cpp"
    first = fetch("--dest", str(dest), env_extra={"PYMOE_LLAMA_SDIST": sdist})
    assert first.returncode == 0, first.stderr
    stamp = json.loads((dest / ".pymoe-stamp.json").read_text())
    assert stamp["upstream_commit"] == "0c1e570"
    assert [p[0] for p in stamp["patches"]] == sorted(p.name for p in (ROOT / "native" / "patches").glob("*.patch"))
    assert (dest / "include" / "llama.h").is_file()
    marker = dest / "include" / "llama.h"
    mtime = marker.stat().st_mtime_ns
    second = fetch("--dest", str(dest), env_extra={"PYMOE_LLAMA_SDIST": sdist})
    assert second.returncode == 0 and "ready" not in second.stderr  # stamp matched: untouched
    assert marker.stat().st_mtime_ns == mtime
    assert fetch("--print-commit").stdout.strip() == "0c1e570"


def test_a_patch_that_does_not_apply_is_a_clear_error(tmp_path, sdist):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-bogus.patch").write_text(
        "--- a/include/llama.h\n+++ b/include/llama.h\n@@ -1,3 +1,3 @@\n-this line is not there\n+nor this\n context\n"
    )
    dest = tmp_path / "llama.cpp"
    proc = fetch("--dest", str(dest), "--patches", str(patches), env_extra={"PYMOE_LLAMA_SDIST": sdist})
    assert proc.returncode == 1
    assert "0001-bogus.patch does not apply" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not dest.exists()  # nothing half-patched left behind
    assert [p.name for p in tmp_path.iterdir()] == ["patches"]


def test_a_wrong_sdist_is_refused(tmp_path):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the release")
    proc = fetch("--dest", str(tmp_path / "llama.cpp"), env_extra={"PYMOE_LLAMA_SDIST": str(fake)})
    assert proc.returncode == 1
    assert "sha256" in proc.stderr and "does not match" in proc.stderr
    assert not (tmp_path / "llama.cpp").exists()


def test_local_edits_are_not_discarded(tmp_path, sdist):
    dest = tmp_path / "llama.cpp"
    env = {"PYMOE_LLAMA_SDIST": sdist}
    assert fetch("--dest", str(dest), "--no-patches", env_extra=env).returncode == 0
    edited = dest / "src" / "llama-graph.cpp"
    stamp_time = (dest / ".pymoe-stamp.json").stat().st_mtime
    os.utime(edited, (stamp_time + 60, stamp_time + 60))
    # the patches differ from the stamp, so the tree would be replaced: refused
    proc = fetch("--dest", str(dest), env_extra=env)
    assert proc.returncode == 1
    assert "local edits" in proc.stderr and "src/llama-graph.cpp" in proc.stderr and "make_patch.py" in proc.stderr
    assert json.loads((dest / ".pymoe-stamp.json").read_text())["patches"] == []
    assert fetch("--dest", str(dest), "--force", env_extra=env).returncode == 0
