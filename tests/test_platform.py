"""The platform layer (native/pymoe-platform.*): reads of byte ranges as the
expert store makes them, uncached and buffered, with short and interrupted
reads injected; available memory under a cgroup limit; the capability flags.
These run on Linux; macOS and Windows are cross-compiled only (docs/wheels.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

from pymoe import _core

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the platform tests measure Linux behaviour")

ALIGN = 4096


@pytest.fixture(autouse=True)
def no_faults_left():
    _core.io_fault_clear()
    yield
    _core.io_fault_clear()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> tuple[Path, bytes]:
    """Random bytes whose length is not a multiple of the alignment."""
    path = tmp_path_factory.mktemp("platform") / "data.bin"
    data = np.random.default_rng(7).integers(0, 256, 5 * ALIGN * 64 + 1234, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return path, data


RANGES = [
    (0, 1),
    (0, ALIGN),
    (1, ALIGN),  # crosses a page
    (ALIGN - 1, 2),
    (777, 3 * ALIGN + 5),
    (ALIGN * 7, ALIGN * 9),  # aligned both ends
    (123_457, 654_321),
]


@pytest.mark.parametrize("uncached", [True, False])
def test_unaligned_ranges_read_exactly(data_file, uncached):
    path, data = data_file
    n = len(data)
    for off, size in [*RANGES, (n - 10, 10), (n - ALIGN - 3, ALIGN + 3), (0, n)]:  # the last ones end at the end
        assert _core.platform_read(str(path), off, size, uncached) == data[off : off + size], (off, size)


@pytest.mark.parametrize("uncached", [True, False])
def test_a_file_shorter_than_asked_is_an_error(data_file, uncached):
    path, data = data_file
    n = len(data)
    for off, size in [(n - 10, 11), (n - 5000, 9000), (n, 1), (n + ALIGN * 3, 100)]:
        with pytest.raises(RuntimeError, match=rf"ends before byte {off + size} .*hint: the file is truncated"):
            _core.platform_read(str(path), off, size, uncached)


@pytest.mark.parametrize("uncached", [True, False])
@pytest.mark.parametrize("kind", ["eintr", "partial"])
def test_interrupted_and_partial_reads_are_retried(data_file, uncached, kind):
    """An interrupted OS call is asked again and a partial one continued: the
    bytes are the file's, and the caller never sees the fault."""
    path, data = data_file
    for off, size in RANGES:
        _core.io_fault(kind, 1)
        assert _core.platform_read(str(path), off, size, uncached) == data[off : off + size], (kind, off, size)
    _core.io_fault(kind, 1, count=3)  # consecutive requests
    for _ in range(4):
        assert _core.platform_read(str(path), 5, 100_000, uncached) == data[5:100_005]


@pytest.mark.parametrize("uncached", [True, False])
def test_eio_and_short_reads_are_errors(data_file, uncached):
    path, data = data_file
    off, size = 10_000, 50_000
    _core.io_fault("eio", 1)
    with pytest.raises(RuntimeError) as e:
        _core.platform_read(str(path), off, size, uncached)
    at = off - off % ALIGN if uncached else off
    assert f"reading '{path}' at byte {at} failed: Input/output error; hint:" in str(e.value)
    assert _core.platform_read(str(path), off, size, uncached) == data[off : off + size]  # count=1: one request

    _core.io_fault("short", 1)  # fewer bytes than asked, then the file looks shorter
    with pytest.raises(RuntimeError, match=rf"'{re.escape(str(path))}' ends before byte {off + size} "):
        _core.platform_read(str(path), off, size, uncached)
    _core.io_fault("short", 1)  # even a read within one page
    with pytest.raises(RuntimeError, match="truncated"):
        _core.platform_read(str(path), 5, 10, uncached)


def test_faults_count_requests_from_the_call(data_file):
    path, data = data_file
    _core.io_fault("eio", 2, count=2)
    results = []
    for _ in range(5):
        try:
            results.append(_core.platform_read(str(path), 0, 100) == data[:100])
        except RuntimeError:
            results.append(None)
    assert results == [True, None, None, True, True]
    _core.io_fault("eio", 1)
    _core.io_fault_clear()
    assert _core.platform_read(str(path), 0, 100) == data[:100]


def test_fault_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown I/O fault 'enospc'; hint: eio, short, eintr or partial"):
        _core.io_fault("enospc", 1)
    with pytest.raises(ValueError, match="nth and count start at 1"):
        _core.io_fault("eio", 0)
    with pytest.raises(ValueError, match="nth and count start at 1"):
        _core.io_fault("eio", 1, count=0)


def test_a_file_system_without_uncached_reads_falls_back_to_buffered_reads():
    """procfs refuses O_DIRECT (as tmpfs did before Linux 6.6): the layer reads
    through the cache instead, and says so."""
    text = Path("/proc/version").read_bytes()
    assert _core.platform_capabilities("/proc/version")["uncached_reads"] is False
    assert _core.platform_read("/proc/version", 3, len(text) - 3, True) == text[3:]


def test_capabilities_on_linux(data_file):
    caps = _core.platform_capabilities()
    assert caps["os"] == "linux"
    assert all(caps[k] for k in ("uncached_reads", "drop_file_cache", "mapping_will_need", "mapping_release"))
    assert "cgroup" in caps["available_memory"]
    assert _core.platform_capabilities(str(data_file[0]))["uncached_reads"]  # ext4 allows O_DIRECT
    with pytest.raises(RuntimeError, match=r"cannot open '/nonexistent/x\.gguf': No such file"):
        _core.platform_capabilities("/nonexistent/x.gguf")


# --- the expert store's reads, with faults


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    synth = load_tool("make_synthetic_moe")
    return synth.write_model("tiny", tmp_path_factory.mktemp("platform-moe") / "tiny.gguf", seed=5)


def expert_ranges(path: Path, layer: int, expert: int) -> list[tuple[int, int]]:
    """(file offset, bytes) of each projection of one expert, in the store's order."""
    info = _core.read_gguf(str(path), 0)
    order = {"gate": 0, "up": 1, "down": 2, "gate_up": 3}
    out = []
    for t in info["tensors"]:
        m = re.fullmatch(rf"blk\.{layer}\.ffn_(gate|up|down|gate_up)_exps\.weight", t["name"])
        if m:
            per_expert = t["nbytes"] // t["shape"][2]
            out.append((order[m[1]], t["offset"] + expert * per_expert, per_expert))
    return [(o, n) for _, o, n in sorted(out)]


@pytest.mark.parametrize("direct_io", [True, False])
def test_store_reads_an_expert_and_reports_faults(tiny_moe, direct_io):
    raw = tiny_moe.read_bytes()
    ranges = expert_ranges(tiny_moe, 1, 5)
    want = [raw[o : o + n] for o, n in ranges]
    assert len(want) == 3 and all(len(w) > ALIGN for w in want)
    assert _core.expert_read(str(tiny_moe), 1, 5, direct_io) == want

    # one request per projection here: the second one fails
    _core.io_fault("eio", 2)
    with pytest.raises(RuntimeError) as e:
        _core.expert_read(str(tiny_moe), 1, 5, direct_io)
    at = ranges[1][0] - ranges[1][0] % ALIGN if direct_io else ranges[1][0]
    assert f"reading '{tiny_moe}' at byte {at} failed: Input/output error" in str(e.value)

    _core.io_fault("short", 3)
    with pytest.raises(RuntimeError, match=rf"ends before byte {ranges[2][0] + ranges[2][1]} .*truncated"):
        _core.expert_read(str(tiny_moe), 1, 5, direct_io)

    for kind in ("eintr", "partial"):  # invisible
        _core.io_fault(kind, 1, count=3)
        assert _core.expert_read(str(tiny_moe), 1, 5, direct_io) == want

    with pytest.raises(ValueError, match="no expert 8 in layer 1; hint: 8 experts"):
        _core.expert_read(str(tiny_moe), 1, 8, direct_io)


# --- available memory


def reference_available_memory() -> int:
    """MemAvailable, capped by the limit - usage of each memory cgroup of this process."""
    avail = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemAvailable:")
    )
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            files = (f"/sys/fs/cgroup{rel}/memory.max", f"/sys/fs/cgroup{rel}/memory.current")
        elif "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{rel}"
            files = (f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes")
        else:
            continue
        try:
            limit, usage = (Path(f).read_text().strip() for f in files)
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            avail = min(avail, int(limit) - int(usage))
    return avail


def test_available_memory_matches_the_kernel():
    native, ref = _core.available_memory(), reference_available_memory()
    assert abs(native - ref) < 256 << 20, (native, ref)  # others' processes move it between the two reads


PROBE = """
import pymoe._core as c, sys
sys.path.insert(0, {tests!r})
from test_platform import reference_available_memory
print(c.available_memory(), reference_available_memory())
"""


def test_available_memory_honours_a_cgroup_limit():
    bench = load_tool("bench_offload")
    if os.geteuid() != 0 or bench.memory_hierarchy() is None:
        pytest.skip("needs root and a memory cgroup controller (v1 or v2)")
    limit = 300 << 20
    with bench.MemCgroup(limit) as cg:
        probe = PROBE.format(tests=str(Path(__file__).parent))
        join = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg.path / "cgroup.procs")]
        proc = subprocess.run(
            [*join, sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).parent,  # not the repository root, whose pymoe/ has no built _core
        )
    assert proc.returncode == 0, proc.stderr
    native, ref = (int(x) for x in proc.stdout.split())
    assert 0 < native < limit
    assert abs(native - ref) < 16 << 20, (native, ref)
