"""tools/bench_offload.py (the CPU-only benchmark under a memory limit) and tools/readahead.py: what
can be checked without running the benchmark itself (which needs root, llama-bench and minutes):
the memory limit as a share of the model, the plan of runs for real-size models, the refusal when
the disk lacks room, the llama-bench and losetup commands; and, as root, the loop device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, load_tool

sys.path.insert(0, str(ROOT / "tools"))  # the tools import their neighbours (pagecache, readahead)
bench = load_tool("bench_offload")
readahead = load_tool("readahead")
synth = load_tool("make_synthetic_moe")

GIB = 1 << 30
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices)")


def test_limit_as_a_share_of_the_model_or_a_size():
    assert bench.parse_limit("1/3", 3000) == 1000
    assert bench.parse_limit("0.5", 3000) == 1500
    assert bench.parse_limit("33%", 3000) == 990
    assert bench.parse_limit("1", 3000) == 3000  # the whole model, not one byte
    assert bench.parse_limit("576MiB", 3000) == 576 << 20
    assert bench.parse_limit(" 8GiB ", 3000) == 8 * GIB
    for bad in ("0", "0/3", "2/1", "150%"):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\].*hint: write a size"):
            bench.parse_limit(bad, 3000)
    for bad in ("x", "1/0", "a/3", "-1", "3 parsecs"):
        with pytest.raises(ValueError, match=r"cannot read .* as a memory limit; hint"):
            bench.parse_limit(bad, 3000)


def parse(*argv: str):
    return bench.setup_arg_parser().parse_args(list(argv))


def test_real_size_presets_get_the_short_plan():
    mixtral = synth.sizes(synth.resolve("mixtral-8x7b")).total
    qwen = synth.sizes(synth.resolve("qwen3-30b-a3b")).total
    mini = synth.sizes(synth.resolve("mixtral-mini")).total
    assert min(mixtral, qwen) >= bench.LARGE_MODEL > mini

    args = parse("--preset", "mixtral-8x7b", "--trace", "T.jsonl")
    assert bench.plan_defaults(args, mixtral, trace_fits=True)
    assert bench.parse_limit(args.limit, mixtral) == mixtral // 3
    assert (args.retries, args.prefill_warmup) == (0, False)
    plan = [(p.config, p.mode, p.tokens, p.reps, p.warmup) for p in bench.plan_runs(args)]
    assert plan == [
        ("b", "pp", 16, 1, False),  # llama-bench at the disk's read-ahead
        ("r", "pp", 16, 1, False),  # ... and at 128 KiB, through the loop device
        ("c", "pp", 16, 1, False),  # pymoe, the Mixtral trace replayed
        ("b", "tg", 8, 1, True),
        ("r", "tg", 8, 1, True),
        ("c", "tg", 32, 1, True),
    ]
    # Qwen3's 128 experts top-8 cannot replay the Mixtral trace: its own router (e) instead
    args = parse("--preset", "qwen3-30b-a3b")
    assert bench.plan_defaults(args, qwen, trace_fits=False)
    assert [p.config for p in bench.plan_runs(args)] == ["b", "r", "e"] * 2
    # what the command line sets stays
    args = parse("--preset", "mixtral-8x7b", "--limit", "10GiB", "--tg", "16", "--prefill-warmup", "--configs", "r,c")
    bench.plan_defaults(args, mixtral, trace_fits=True)
    assert args.limit == "10GiB"
    assert [(p.config, p.tokens, p.warmup) for p in bench.plan_runs(args)] == [
        ("r", 16, True),
        ("c", 16, True),
        ("r", 8, True),
        ("c", 16, True),
    ]


def test_small_models_keep_the_full_plan():
    args = parse("--trace", "T.jsonl")
    assert not bench.plan_defaults(args, 1 * GIB, trace_fits=True)
    assert (args.limit, args.reserve, args.retries) == ("576MiB", "128MiB", 2)
    plan = bench.plan_runs(args)
    assert [p.config for p in plan] == list("abrcde") * 2
    assert {(p.config, p.mode): (p.tokens, p.reps) for p in plan}[("a", "pp")] == (512, 2)
    assert {(p.config, p.mode): (p.tokens, p.reps) for p in plan}[("r", "tg")] == (16, 1)
    assert all(p.warmup for p in plan)


def test_configurations_and_trace_are_checked_before_anything_runs(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [
        {"problem_id": 0, "token_idx": t, "layer": layer, "experts": [t % 8, (t + 3) % 8], "gating_probs": [0.7, 0.3]}
        for t in range(8)
        for layer in range(2)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.trace_fit(trace, 8, 2) == (True, None)
    fits, why = bench.trace_fit(trace, 128, 8)
    assert not fits and "top-2 of 8 experts, the model top-8 of 128" in why and "hint" in why
    assert not bench.trace_fit(None, 8, 2)[0]
    args = parse("--configs", "b,x")
    bench.plan_defaults(args, 1 * GIB, True)
    assert "unknown configuration(s) 'x'" in bench.check_plan(args, True, None)
    args = parse("--preset", "qwen3-30b-a3b", "--configs", "b,c")
    bench.plan_defaults(args, 20 * GIB, False)
    assert "replay a routing trace: " + why in bench.check_plan(args, False, why)


class StatVfs:
    def __init__(self, free: int) -> None:
        self.f_frsize, self.f_bavail = 4096, free // 4096


def test_refuses_a_model_the_disk_has_no_room_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.os, "statvfs", lambda _path: StatVfs(10 * GIB))
    assert bench.disk_room_problem(tmp_path, 8 * GIB, "m") is None
    problem = bench.disk_room_problem(tmp_path, 25 * GIB, "the mixtral-8x7b model")
    assert "has 10.00 GiB free; the mixtral-8x7b model needs 25.00 GiB there" in problem
    assert "16.00 GiB more; hint:" in problem and "--workdir" in problem
    # the command refuses before it writes anything (and before it needs root)
    rc = bench.main(["--preset", "mixtral-8x7b", "--workdir", str(tmp_path), "--configs", "b,r,e"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} has 10.00 GiB free; the mixtral-8x7b model needs 25.") and "hint" in err
    assert list(tmp_path.iterdir()) == []


def test_llama_bench_and_losetup_commands():
    argv = bench.llama_bench_argv("llama-bench", "/dev/loop7", 2, "tg", 8, 1, warmup=True, repack=False)
    assert argv == [
        "llama-bench", "-m", "/dev/loop7", "-t", "2", "-fa", "off", "-lm", "mmap", "--repack", "0",
        "-r", "1", "-o", "json", "--progress", "-p", "0", "-n", "8",
    ]  # fmt: skip
    argv = bench.llama_bench_argv("llama-bench", "m.gguf", 2, "pp", 16, 1, warmup=False, repack=True)
    assert "--repack" not in argv and "--no-warmup" in argv and argv[-4:] == ["-p", "16", "-n", "0"]
    assert readahead.loop_attach_argv(Path("/x/m.gguf")) == [
        "losetup", "--find", "--show", "--read-only", "--direct-io=on", "/x/m.gguf",
    ]  # fmt: skip
    assert readahead.loop_detach_argv("/dev/loop7") == ["losetup", "--detach", "/dev/loop7"]


def test_a_loop_device_needs_whole_sectors(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 1000)
    assert "not a whole number of 512-byte sectors" in readahead.loop_problem(f)
    assert readahead.pad_to_sectors(f) == 24 and f.stat().st_size == 1024
    assert f.read_bytes() == b"x" * 1000 + b"\0" * 24
    assert readahead.pad_to_sectors(f) == 0
    assert readahead.loop_problem(f) in (None, "a loop device needs root")


def test_read_ahead_of_the_disk_that_holds_a_file():
    found = readahead.device_read_ahead(ROOT / "README.md")
    if found is None:
        pytest.skip("the checkout is on no block device (tmpfs, network file system)")
    dev, kb = found
    assert kb == int(Path(f"/sys/block/{dev}/queue/read_ahead_kb").read_text())


def attached(path: Path) -> str:
    return subprocess.run(["losetup", "--associated", str(path)], capture_output=True, text=True, check=True).stdout


@as_root
def test_loop_device_read_ahead_and_detached_on_every_exit(tmp_path):
    cached_bytes = load_tool("pagecache").cached_bytes
    f = tmp_path / "m.bin"
    f.write_bytes(os.urandom(4 << 20))
    with readahead.LoopDevice(f, 64) as loop:  # not the loop driver's default (128 here), to see it set
        dev = Path(loop.device)
        assert loop.read_ahead_kb == 64 and loop.direct_io is True
        assert readahead.device_read_ahead(dev) == (loop.name, 64)
        with open(dev, "rb", buffering=0) as reader:
            for _ in range(16):
                reader.read(64 << 10)
            # 1 MiB read in order: at most one read-ahead window (64 KiB) past it of the 4 MiB cached
            assert 1 << 20 <= cached_bytes(dev) <= (1 << 20) + (64 << 10)
            loop.flush()
            assert cached_bytes(dev) == 0
        assert str(f) in attached(f)
    assert attached(f) == ""
    with pytest.raises(KeyboardInterrupt), readahead.LoopDevice(f, 256) as loop:
        assert str(f) in attached(f)
        raise KeyboardInterrupt  # Ctrl-C
    assert attached(f) == ""


def test_markdown_states_the_read_ahead_bandwidth_and_roofline():
    report = {
        "roofline_bandwidth": 1.3e9,
        "roofline_no_cache": 0.2,
        "limit": 8 * GIB,
        "read_ahead": {"device": "vda", "read_ahead_kb": 8192},
        "loop": {"device": "/dev/loop0", "read_ahead_kb": 128, "direct_io": True},
        "results": [],
    }
    head = bench.markdown(report).splitlines()[0]
    assert head == (
        "Disk: `read_ahead_kb` 8192 (vda), r's loop device 128 (direct-io on); O_DIRECT bandwidth 1.30 GB/s; "
        "roofline with no expert in memory 0.20 tok/s; limit 8192 MiB."
    )
    del report["read_ahead"], report["loop"], report["roofline_no_cache"]  # a report from before
    assert bench.markdown(report).startswith("| cfg | run |")


def test_refuses_to_write_the_model_to_a_tmpfs(tmp_path, capsys):
    shm = Path("/dev/shm")
    if not shm.is_dir() or readahead.device_read_ahead(shm) is not None:
        pytest.skip("no tmpfs at /dev/shm")
    workdir = Path(tempfile.mkdtemp(dir=shm))
    try:
        assert bench.main(["--preset", "tiny", "--workdir", str(workdir), "--configs", "b,r,e"]) == 1
        assert "is on no block device (a tmpfs?)" in capsys.readouterr().err
        assert list(workdir.iterdir()) == []
    finally:
        workdir.rmdir()
