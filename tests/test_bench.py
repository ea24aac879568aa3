"""`pymoe bench`: speeds and cache counters per budget, a plot, llama-bench for comparison."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, load_tool, run_pymoe


def test_bench_budgets_json_and_plot(tiny, tmp_path):
    model = tiny.gguf("mixtral")
    png = tmp_path / "bench.png"
    proc = run_pymoe(
        "bench",
        str(model),
        "--budgets",
        "off,0.5",
        "-p",
        "16",
        "-n",
        "6",
        "--json",
        "--plot",
        str(png),
        "--policy",
        "lfu",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    off, half = report["results"]
    assert off["budget"] == "off" and not off["offload"] and "hit_rate" not in off and "summary" not in off
    assert half["offload"] and half["policy"] == "lfu" and 0.0 <= half["hit_rate"] <= 1.0
    for r in (off, half):
        assert r["pp_tokens_per_second"] > 0 and r["tg_tokens_per_second"] > 0 and r["peak_rss_bytes"] > 0
    assert half["pool_bytes"] <= 0.5 * 9437184 + 1 and half["bytes_per_decode_token"] >= 0
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_table(tiny):
    """The table, then per configuration the summary of chat's /stats (speed of the timed runs: 8 prompt
    tokens and 3 decode steps, no warm-up in them)."""
    proc = run_pymoe("bench", str(tiny.gguf("mixtral")), "--budgets", "off,0.25", "-p", "8", "-n", "3")
    assert proc.returncode == 0, proc.stderr
    assert "hit rate" in proc.stdout and "0.25" in proc.stdout
    _, off, quarter = proc.stdout.split("\nbudget ")
    speed = r"\n  speed +prompt [\d.]+ tok/s \(8 tokens\), generation [\d.]+ tok/s \(3 tokens\)\n"
    assert re.match(r"off:" + speed + r"  experts +offload is off", off), off
    assert re.match(r"0\.25:" + speed + r"  experts +disk tier, lru policy; \d+ slots", quarter), quarter
    assert re.search(r"^  hit rate +[\d.]+% of \d+ lookups", quarter, re.M), quarter


LLAMA_BENCH = ROOT / "build" / "llama-tools" / "bin" / "llama-bench"


@pytest.mark.skipif(not LLAMA_BENCH.is_file(), reason="llama-bench not built (tools/build_llama_tools.sh)")
def test_bench_vs_llama_cpp(tiny, monkeypatch):
    # an installed (not editable) pymoe finds the checkout's llama-bench through the environment
    monkeypatch.setenv("PYMOE_LLAMA_BENCH", str(LLAMA_BENCH))
    proc = run_pymoe(
        "bench", str(tiny.gguf("mixtral")), "--budgets", "off", "-p", "16", "-n", "4", "--vs-llama-cpp", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(proc.stdout)["llama_cpp"]
    assert ref["pp_tokens_per_second"] > 0 and ref["tg_tokens_per_second"] > 0 and "llama-bench" in ref["command"]


def test_bench_replay_and_progress(tiny, tmp_path):
    # a trace that routes the first token to experts 6 and 7 and every later one to 0 and 1, in every layer
    trace = tmp_path / "trace.jsonl"
    with trace.open("w") as f:
        for t in range(40):
            for layer in range(2):
                experts = [6, 7] if t == 0 else [0, 1]
                f.write(json.dumps({"problem_id": 0, "layer": layer, "experts": experts, "gating_probs": [0.7, 0.3]}))
                f.write("\n")
    model = str(tiny.gguf("mixtral"))
    proc = run_pymoe("bench", model, "--budgets", "0.5", "-p", "16", "-n", "6", "-b", "8", "--replay", str(trace))
    assert proc.returncode == 0, proc.stderr
    # progress inside the configuration: its phases, the prompt in n_batch steps
    for phase in ("loading", "warm-up", "prefill", "decode"):
        assert f"budget 0.5: {phase}" in proc.stderr, proc.stderr
    assert "8/16" in proc.stderr and "6/6" in proc.stderr
    proc = run_pymoe("bench", model, "--budgets", "0.5", "-p", "16", "-n", "6", "--replay", str(trace), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "budget 0.5: decode" not in proc.stderr  # --json: quiet
    r = json.loads(proc.stdout)["results"][0]
    assert r["replay"] == [str(trace)]
    # the engine saw the trace's experts: after the warm-up, 0 and 1 are (almost always) in the cache of
    # every layer; the model's own router hits 0.65 at this budget
    assert r["hit_rate"] > 0.9
    off = run_pymoe("bench", model, "--budgets", "off", "-p", "4", "-n", "2", "--replay", str(trace))
    assert off.returncode != 0 and "--replay routes through the offload engine" in off.stderr


def _fake_llama_bench(path, body):
    """A stand-in llama-bench that records its arguments (the real one is tested above)."""
    path.write_text(f'#!/bin/sh\necho "$@" > {path}.args\n{body}\n')
    path.chmod(0o755)
    return path


JSON_ROWS = '[{"n_prompt": 8, "n_gen": 0, "avg_ts": 10.0}, {"n_prompt": 0, "n_gen": 2, "avg_ts": 5.0}]'


def test_bench_llama_bench_arguments_and_failures(tiny, tmp_path):
    model = str(tiny.gguf("mixtral"))
    common = ("bench", model, "--budgets", "off", "-p", "8", "-n", "2", "--vs-llama-cpp", "--llama-bench")
    ok = _fake_llama_bench(tmp_path / "ok", f"echo 'llama-bench: benchmark 1/2: prompt run' >&2\necho '{JSON_ROWS}'")
    proc = run_pymoe(*common, str(ok), "--no-repack", "--no-warmup")
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "ok.args").read_text().split()
    assert "--no-warmup" in args and args[args.index("--repack") + 1] == "0"
    assert "llama-bench: benchmark 1/2: prompt run" in proc.stderr  # its progress is passed on
    assert "pymoe / llama.cpp" in proc.stdout
    proc = run_pymoe(*common, str(ok))
    args = (tmp_path / "ok.args").read_text().split()
    assert proc.returncode == 0 and "--no-warmup" not in args and "--repack" not in args
    # a failure shows what llama-bench said and how it ended
    bad = _fake_llama_bench(tmp_path / "bad", "echo 'error: failed to load model x' >&2\nexit 3")
    proc = run_pymoe(*common, str(bad))
    assert proc.returncode == 1
    assert "llama-bench exited with status 3" in proc.stderr and "error: failed to load model x" in proc.stderr
    crash = _fake_llama_bench(tmp_path / "crash", "kill -SEGV $$")
    proc = run_pymoe(*common, str(crash))
    assert "killed by SIGSEGV" in proc.stderr and "it printed nothing" in proc.stderr
    assert "--no-repack" in proc.stderr  # the hint for repacked kernels that crash


@pytest.mark.skipif(not LLAMA_BENCH.is_file(), reason="llama-bench not built (tools/build_llama_tools.sh)")
def test_bench_real_llama_bench_arguments_and_failure(tiny, tmp_path):
    from pymoe.bench import run_llama_bench

    proc = run_pymoe(
        "bench", str(tiny.gguf("mixtral")), "--budgets", "off", "-p", "8", "-n", "2", "--vs-llama-cpp", "--json",
        "--llama-bench", str(LLAMA_BENCH), "--no-repack", "--no-warmup",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(proc.stdout)["llama_cpp"]
    assert "--repack 0" in ref["command"] and "--no-warmup" in ref["command"] and ref["tg_tokens_per_second"] > 0
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"GGUF" + b"\0" * 64)
    args = argparse.Namespace(
        llama_bench=str(LLAMA_BENCH), model=not_gguf, prompt_tokens=8, gen_tokens=2, n_threads=1, warmup=True,
        repack=True, json=True,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="llama-bench exited with status") as err:
        run_llama_bench(args)
    assert "failed to load model" in str(err.value)  # llama-bench's own words


def test_bench_cgroup_peak(tiny, tmp_path):
    tool = load_tool("bench_offload")
    if os.geteuid() != 0 or tool.memory_hierarchy() is None:
        pytest.skip("needs root and a memory cgroup controller (v1 or v2)")
    model = tiny.gguf("mixtral")
    limit = 1 << 30
    with tool.MemCgroup(limit) as cg:
        join = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg.path / "cgroup.procs")]
        proc = subprocess.run(
            [*join, sys.executable, "-m", "pymoe", "bench", str(model), "--budgets", "off,0.5", "-p", "8", "-n", "2"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT / "tests",
        )
        assert proc.returncode == 0, proc.stderr
        assert "cgroup peak" in proc.stdout and "page cache included" in proc.stdout
        proc = subprocess.run(
            [
                *join,
                sys.executable,
                "-m",
                "pymoe",
                "bench",
                str(model),
                "--budgets",
                "off",
                "-p",
                "8",
                "-n",
                "2",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT / "tests",
        )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)["results"][0]
    assert r["cgroup_limit_bytes"] == limit
    # the file was dropped from the page cache, then read through the mapping (and the processes' own memory)
    assert model.stat().st_size <= r["cgroup_peak_bytes"] <= limit
    if tool.memory_hierarchy()[0] == 1:
        assert r["cgroup_peak_since"] == "configuration start"


def test_bench_errors(dense_gguf, tiny, tmp_path):
    dense = run_pymoe("bench", str(dense_gguf), "--budgets", "0.5", "-p", "4", "-n", "2")
    assert dense.returncode != 0 and "dense model" in dense.stderr
    missing = run_pymoe(
        "bench",
        str(tiny.gguf("mixtral")),
        "--budgets",
        "off",
        "-p",
        "4",
        "-n",
        "2",
        "--vs-llama-cpp",
        "--llama-bench",
        str(tmp_path / "nope"),
    )
    assert missing.returncode != 0 and "llama-bench not found" in missing.stderr


def _executable(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_find_llama_bench(tmp_path, monkeypatch):
    from pymoe.bench import find_llama_bench

    checkout = tmp_path / "checkout"
    built = _executable(checkout / "build" / "llama-tools" / "bin" / "llama-bench")
    (checkout / "tools").mkdir()
    (checkout / "tools" / "build_llama_tools.sh").write_text("")
    (checkout / "tests").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.delenv("PYMOE_LLAMA_BENCH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    # outside any checkout: not found, wherever the imported package lives
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError, match="llama-bench not found"):
        find_llama_bench()
    # the checkout you run from, from any folder in it
    for cwd in (checkout, checkout / "tests"):
        monkeypatch.chdir(cwd)
        assert find_llama_bench() == built
    # a build/ folder that is not in a pymoe checkout is not taken for one
    _executable(elsewhere / "build" / "llama-tools" / "bin" / "llama-bench")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError, match="llama-bench not found"):
        find_llama_bench()
    # then PATH
    on_path = _executable(tmp_path / "bin" / "llama-bench")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_llama_bench() == on_path
    # the environment before both, and an explicit path before everything
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("PYMOE_LLAMA_BENCH", str(on_path))
    assert find_llama_bench() == on_path
    assert find_llama_bench(str(built)) == built
    monkeypatch.setenv("PYMOE_LLAMA_BENCH", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="PYMOE_LLAMA_BENCH"):
        find_llama_bench()


def test_timed_run(tiny):
    from pymoe import Model
    from pymoe.bench import timed_run

    with Model(tiny.gguf("mixtral"), n_ctx=64, offload="on", expert_budget=0.5) as m:
        run = timed_run(m, n_prompt=8, n_gen=4, reps=2, greedy=True, decode_stats=True)
        assert len(run.pp_seconds) == len(run.tg_seconds) == 2 and run.wall_seconds >= sum(run.tg_seconds)
        assert run.pp_tokens_per_second > 0 and run.tg_tokens_per_second > 0 and run.cpu_seconds > 0
        # the counters were zeroed after the warm-up: two repetitions of 8 + 4 tokens
        assert m.offload_stats()["steps"] > 0 and len(run.decode_stats) == 4
        before = run.stats_after_prefill["layers"]
        after = run.decode_stats[-1]["layers"]
        assert sum(a["pairs"] - b["pairs"] for a, b in zip(after, before, strict=True)) > 0
        assert run.read_bytes is None or run.read_bytes >= 0
        # decode only, from an empty cache, as llama-bench's tg
        tg = timed_run(m, n_prompt=0, n_gen=3)
        assert tg.pp_seconds == [] and len(tg.tg_seconds) == 1 and tg.stats_after_prefill is None
        with pytest.raises(ValueError, match="prompt or decode tokens"):
            timed_run(m, n_prompt=0, n_gen=0)
