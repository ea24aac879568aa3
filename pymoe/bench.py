"""`pymoe bench`: prefill and decode speed of a model at one or more expert
budgets, with the engine's counters: hit rate, bytes moved per token, the
share of pairs computed where the weights live, and peak memory.

Each configuration runs in a fresh process (so its peak memory is its own).
As llama-bench times its tests: one untimed warm-up prompt, then from an
empty KV cache a --prompt-tokens batch of random token ids (BOS first when
the model adds one) for prefill, and --gen-tokens single-token steps after
it for decode (greedy, EOS ignored), each timed apart. --vs-llama-cpp runs the pinned
llama.cpp's own llama-bench (tools/build_llama_tools.sh builds it) on the
same file, with the same warm-up and repacking choices, and prints pymoe's
speed relative to it. --replay feeds the engine a recorded routing trace
instead of the model's router (a benchmark mode: a random model then sees a
real model's access pattern). Progress inside a configuration goes to
stderr. Under a memory cgroup limit (v1 or v2) each configuration also
reports the cgroup's peak, page cache included, from a cold page cache."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from . import settings as settings_mod
from . import stats as counters
from ._args import add_model_args, budget_arg
from ._units import MiB, format_bytes
from .gguf_info import summarize

if TYPE_CHECKING:
    from .model import Model


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pymoe bench")
    parser.description = __doc__
    add_model_args(parser)
    parser.add_argument(
        "--budgets",
        default=None,
        metavar="LIST",
        help="comma-separated expert budgets to compare, e.g. off,0.25,0.5,2GiB "
        "(default: the --expert-budget/--offload of the model flags)",
    )
    parser.add_argument("-p", "--prompt-tokens", type=int, default=512, metavar="N", help="prefill length (512)")
    parser.add_argument("-n", "--gen-tokens", type=int, default=128, metavar="N", help="decode steps (128)")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="time the first run too (by default an untimed prefill runs first, as in llama-bench)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    parser.add_argument(
        "--replay",
        nargs="+",
        metavar="TRACE",
        help="BENCHMARK MODE: route every token by a recorded trace instead of the model's router (the files "
        "`pymoe simulate --trace` reads; its top-k and expert count must match the model's); needs offload on",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw per-layer expert usage and cache hits over the decode tokens (last budget)",
    )
    parser.add_argument(
        "--vs-llama-cpp",
        action="store_true",
        help="also run the pinned llama.cpp's llama-bench on the same file and print the ratio",
    )
    parser.add_argument(
        "--llama-bench",
        metavar="PATH",
        help="the llama-bench binary (default: $PYMOE_LLAMA_BENCH, then build/llama-tools/bin/llama-bench of the "
        "source checkout you run from, then PATH)",
    )
    return parser


# --- the timed run (tools/bench_offload.py times its runs with it too)


@dataclass
class TimedRun:
    """What `timed_run` measured: the seconds of each repetition and what this
    process did during the timed repetitions."""

    n_prompt: int
    n_gen: int
    pp_seconds: list[float]  # per repetition; empty without a prompt
    tg_seconds: list[float]  # per repetition; empty without decode steps
    wall_seconds: float  # all timed repetitions, from the first start to the last end
    cpu_seconds: float  # this process's CPU time in them, all threads
    read_bytes: int | None  # what this process read from block devices in them (None: not known here)
    stats_after_prefill: dict[str, Any] | None  # the engine's raw counters after the last prefill
    decode_stats: list[dict[str, Any]] = field(default_factory=list)  # raw counters after each decode step

    @property
    def pp_tokens_per_second(self) -> float:
        return self.n_prompt * len(self.pp_seconds) / sum(self.pp_seconds)

    @property
    def tg_tokens_per_second(self) -> float:
        return self.n_gen * len(self.tg_seconds) / sum(self.tg_seconds)


def read_bytes(pid: int | str = "self") -> int | None:
    """Bytes a process has read from block devices so far (`read_bytes` of /proc/PID/io), None where unknown."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds() -> float:
    return time.process_time()  # user + system time of every thread of this process, on every platform


def timed_run(
    model: Model,
    *,
    n_prompt: int,
    n_gen: int,
    reps: int = 1,
    warmup: bool = True,
    seed: int = 0,
    greedy: bool = False,
    decode_stats: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> TimedRun:
    """Times one test the way llama-bench does: an untimed warm-up (a prompt
    when there is one, else one token: the file's pages mapped in, the expert
    cache filled), the counters zeroed, then `reps` repetitions, each from an
    empty cache: a prompt of `n_prompt` tokens in one batch, then `n_gen`
    single-token decode steps. Tokens are random ids, BOS first when the model
    adds one; with `greedy` a decode step feeds the previous step's argmax
    instead (EOS ignored). With `decode_stats` the engine's raw counters are
    read after every decode step of the last repetition (inside the timing).
    `progress(phase, done, total)` is called as the run goes ("warm-up",
    "prefill", "decode"); a prompt is then fed n_batch tokens per call (the
    split the native decode makes anyway), so that it can report inside one."""
    if n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0 or reps < 1:
        raise ValueError("a timed run needs prompt or decode tokens (>= 0, not both 0) and at least one repetition")
    rng = np.random.default_rng(seed)
    bos = model.tokenize("", add_bos=True)  # [BOS] when the model adds one

    def random_ids(n: int) -> list[int]:
        ids = rng.integers(0, model.n_vocab, n).tolist()
        if ids and bos:
            ids[0] = bos[0]
        return ids

    chunk = max(1, model.settings.n_batch) if progress else max(1, n_prompt)

    def prompt(tokens: list[int], phase: str) -> np.ndarray:
        n = len(tokens)
        done = min(chunk, n)
        while True:
            logits = model.next_token_logits(tokens[:done])  # evaluates what the KV cache lacks
            if progress:
                progress(phase, done, n)
            if done == n:
                return logits
            done = min(done + chunk, n)

    if warmup:
        model.reset()
        prompt(random_ids(n_prompt or 1), "warm-up")
    model.reset()
    model.reset_stats()
    offload = model.offload.enabled
    pp: list[float] = []
    tg: list[float] = []
    after_prefill: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = []
    io0, cpu0, t0 = read_bytes(), _cpu_seconds(), time.perf_counter()
    for rep in range(reps):
        model.reset()
        tokens = random_ids(n_prompt)
        logits = None
        if n_prompt:
            t = time.perf_counter()
            logits = prompt(tokens, "prefill")
            pp.append(time.perf_counter() - t)
            after_prefill = model.offload_stats(raw=True) if offload else None
        if not n_gen:
            continue
        record = decode_stats and offload and rep == reps - 1
        t = time.perf_counter()
        for i in range(n_gen):
            if greedy and logits is not None:
                tokens.append(int(np.argmax(logits)))
            else:
                tokens += random_ids(1) if not tokens else rng.integers(0, model.n_vocab, 1).tolist()
            logits = model.next_token_logits(tokens)
            if record:
                steps.append(model.offload_stats(raw=True))
            if progress:
                progress("decode", i + 1, n_gen)
        tg.append(time.perf_counter() - t)
    t1, cpu1, io1 = time.perf_counter(), _cpu_seconds(), read_bytes()
    return TimedRun(
        n_prompt=n_prompt,
        n_gen=n_gen,
        pp_seconds=pp,
        tg_seconds=tg,
        wall_seconds=t1 - t0,
        cpu_seconds=cpu1 - cpu0,
        read_bytes=io1 - io0 if io0 is not None and io1 is not None else None,
        stats_after_prefill=after_prefill,
        decode_stats=steps,
    )


# --- one configuration (in the child process)


def run_one(args: argparse.Namespace, budget: str, record: bool = False) -> dict[str, Any]:
    from .model import Model

    offload = {"offload": "off"} if budget == "off" else {"offload": "on", "expert_budget": budget_arg(budget)}
    # the routing does not depend on the budget: one configuration records it (--record-routing)
    offload["record_routing"] = args.record_routing if record else None
    if args.replay:
        from .gguf_info import summarize
        from .traces import load_trace

        s = summarize(args.model)
        offload["replay"] = load_trace(args.replay).fit_routes(s.n_layer, s.n_expert, s.n_expert_used)
    settings = settings_mod.from_args(args, n_ctx=max(args.n_ctx, args.prompt_tokens + args.gen_tokens + 8), **offload)
    cgroup = CgroupPeak.start(args.model, args.sidecar if args.sidecar != "auto" else None)  # under a limit
    bar = None
    if not args.json:
        from tqdm import tqdm

        bar = tqdm(total=1, desc=f"budget {budget}: loading", unit="tok", file=sys.stderr, leave=False, position=1)

    shown = [""]  # the phase the bar shows

    def progress(phase: str, done: int, total: int) -> None:
        assert bar is not None
        if phase != shown[0]:
            shown[0] = phase
            bar.reset(total=total)
            bar.set_description(f"budget {budget}: {phase}")
        bar.n = done
        bar.refresh()

    t_load = time.perf_counter()
    with Model(args.model, settings) as m:
        load_seconds = time.perf_counter() - t_load
        run = timed_run(
            m,
            n_prompt=args.prompt_tokens,
            n_gen=args.gen_tokens,
            warmup=args.warmup,
            seed=args.seed,
            greedy=True,
            decode_stats=True,
            progress=progress if bar is not None else None,
        )
        if bar is not None:
            bar.close()
        after_pp = run.stats_after_prefill
        per_token: list[list[tuple[int, int]]] = []  # per decode token, per layer: (hits, lookups)
        if after_pp is not None:
            for cur, prev in zip(run.decode_stats, [after_pp, *run.decode_stats[:-1]], strict=True):
                per_token.append(
                    [
                        (d["hits"] + d["hits_lo"], counters.lookups(d))
                        for d in (counters.difference(c, p) for c, p in zip(cur["layers"], prev["layers"], strict=True))
                    ]
                )
        stats = m.offload_stats()
        raw = m.offload_stats(raw=True)
        result: dict[str, Any] = {
            "budget": budget,
            "offload": m.offload.enabled,
            "load_seconds": load_seconds,
            "pp_tokens_per_second": run.pp_tokens_per_second,
            "tg_tokens_per_second": run.tg_tokens_per_second,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        timed = {
            "prompt_tokens": run.n_prompt * len(run.pp_seconds),
            "prompt_seconds": sum(run.pp_seconds),
            "generated_tokens": run.n_gen * len(run.tg_seconds),
            "generate_seconds": sum(run.tg_seconds),
        }
        result["summary"] = counters.summary(stats, timed)  # what `pymoe bench` prints per configuration
        if args.replay:
            result["replay"] = [str(p) for p in args.replay]
        if stats:
            decode_tokens = args.gen_tokens
            tg_bytes = sum(
                c[k] - p[k]
                for c, p in zip(raw["layers"], after_pp["layers"], strict=True)
                for k in ("bytes_loaded", "bytes_loaded_lo", "bytes_direct", "prefetch_bytes")
            )
            result.update(
                {
                    "pool_bytes": stats["pool_bytes"] + stats["pool_bytes_lo"],
                    "n_slots": stats["n_slots"],
                    "policy": stats["policy"],
                    "hit_rate": stats["hit_rate"],
                    "bytes_per_decode_token": tg_bytes / decode_tokens if decode_tokens else 0.0,
                    "direct_share": stats["direct_pairs"] / stats["pairs"] if stats["pairs"] else 0.0,
                    "lo_share": stats["lo_share_of_pairs"],
                    "prefetch_precision": stats["prefetch_precision"],
                    "load_seconds_in_engine": stats["load_seconds"],
                    "read_bandwidth": stats["read_bandwidth"],
                    "expert_pairs": raw["expert_pairs"].tolist(),
                    "decode_hits": per_token,
                }
            )
    if cgroup is not None:
        result.update(cgroup.finish())
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident memory (ru_maxrss is KiB on Linux, bytes on macOS;
    Windows: the peak working set)."""
    if sys.platform == "win32":
        import ctypes
        from ctypes import wintypes

        class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (n, ctypes.c_size_t) for n in ("PeakWorkingSetSize", "WorkingSetSize", "a", "b", "c", "d", "e", "f")
            ]

        c = Counters(cb=ctypes.sizeof(Counters))
        psapi = ctypes.WinDLL("psapi")
        psapi.GetProcessMemoryInfo(ctypes.windll.kernel32.GetCurrentProcess(), ctypes.byref(c), c.cb)
        return int(c.PeakWorkingSetSize)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --- the memory cgroup (Linux)


def memory_cgroup() -> tuple[int, Path, int] | None:
    """This process's memory cgroup when it has a limit: (1 or 2 for cgroup v1 or v2, its folder, the limit
    in bytes); None without a limit or off Linux. The folders are where pymoe's available_memory reads them."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            version, folder, limit_file = 2, Path(f"/sys/fs/cgroup{rel}"), "memory.max"
        elif "memory" in controllers.split(","):
            version, folder, limit_file = 1, Path(f"/sys/fs/cgroup/memory{rel}"), "memory.limit_in_bytes"
        else:
            continue
        try:
            limit = (folder / limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v1 reports no limit as a huge number, v2 as "max"
            return version, folder, int(limit)
    return None


class CgroupPeak:
    """The peak memory of this process's memory cgroup over one configuration, as the cgroup counts it
    (page cache included): the model's file is dropped from the page cache first, and the peak is reset
    where the kernel allows it (v1: memory.max_usage_in_bytes; v2: memory.peak from Linux 6.12), else it
    is the peak since the cgroup began. Other processes of the cgroup count too."""

    PEAK: ClassVar = {1: "memory.max_usage_in_bytes", 2: "memory.peak"}

    def __init__(self, version: int, folder: Path, limit: int) -> None:
        self.version, self.folder, self.limit = version, folder, limit
        self.since_start = True
        self._fd: int | None = None

    @classmethod
    def start(cls, *files: str | os.PathLike[str] | None) -> CgroupPeak | None:
        found = memory_cgroup()
        if found is None:
            return None
        peak = cls(*found)
        for f in files:
            if f:
                drop_page_cache(Path(f))
        path = peak.folder / cls.PEAK[peak.version]
        try:
            if peak.version == 1:
                path.write_text("0")  # resets the peak to the current usage
            else:
                # a write resets the peak that reads through the same open file see (Linux 6.12)
                fd = os.open(path, os.O_RDWR)
                try:
                    os.write(fd, b"reset\n")
                except OSError:
                    os.close(fd)
                    raise
                peak._fd = fd
            peak.since_start = False
        except OSError:
            pass
        return peak

    def finish(self) -> dict[str, Any]:
        """The peak (bytes), the limit and what the peak covers."""
        if self._fd is not None:
            value = os.pread(self._fd, 64, 0)
            os.close(self._fd)
            self._fd = None
        else:
            value = (self.folder / self.PEAK[self.version]).read_bytes()
        return {
            "cgroup_peak_bytes": int(value.strip()),
            "cgroup_limit_bytes": self.limit,
            "cgroup_peak_since": "cgroup start" if self.since_start else "configuration start",
        }


def drop_page_cache(path: Path) -> None:
    """Drops a file's pages from the page cache (pages a process maps stay); nothing where the OS cannot."""
    if not hasattr(os, "posix_fadvise") or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- llama-bench


# where tools/build_llama_tools.sh puts it, in a source checkout
LLAMA_BENCH_EXE = "llama-bench.exe" if sys.platform == "win32" else "llama-bench"
CHECKOUT_LLAMA_BENCH = Path("build") / "llama-tools" / "bin" / LLAMA_BENCH_EXE


def find_llama_bench(path: str | None = None) -> Path:
    """The llama-bench to compare with: `path`; else $PYMOE_LLAMA_BENCH; else
    build/llama-tools/bin/llama-bench of the source checkout that the current
    folder is in (tools/build_llama_tools.sh builds it there); else one on PATH.
    Never a path relative to this package: an installed pymoe is not a checkout."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"llama-bench not found at '{path}'; hint: tools/build_llama_tools.sh builds it")
        return Path(path)
    env = os.environ.get("PYMOE_LLAMA_BENCH")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(
                f"PYMOE_LLAMA_BENCH is '{env}', which is not a file; hint: point it at a built llama-bench or unset it"
            )
        return Path(env)
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        candidate = folder / CHECKOUT_LLAMA_BENCH
        if candidate.is_file() and (folder / "tools" / "build_llama_tools.sh").is_file():
            return candidate
    on_path = shutil.which("llama-bench")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError(
        "llama-bench not found; hint: build it with tools/build_llama_tools.sh (from a source checkout), then run "
        "from the checkout, set PYMOE_LLAMA_BENCH or pass --llama-bench PATH"
    )


def run_llama_bench(args: argparse.Namespace) -> dict[str, Any]:
    exe = find_llama_bench(args.llama_bench)
    threads = args.n_threads or os.cpu_count() or 1
    cmd = [
        str(exe),
        "-m",
        str(args.model),
        "-p",
        str(args.prompt_tokens),
        "-n",
        str(args.gen_tokens),
        "-t",
        str(threads),
        "-r",
        "1",
        "-o",
        "json",
        "--progress",
    ]
    if not args.warmup:
        cmd.append("--no-warmup")  # as pymoe: the first (only) run is the timed one, no prompt twice
    if not args.repack:
        cmd += ["--repack", "0"]  # as pymoe with --no-repack: the same kernels for the dense weights
    # the closest static offload: without a GPU every expert runs on the CPU from the mapped file;
    # a GPU build would keep as many layers' experts on the CPU as the budget cannot hold (--n-cpu-moe)
    # its progress lines (stderr) are passed on as they come, and the last ones kept for an error
    stdout: list[str] = []
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        out = proc.stdout
        reader = threading.Thread(target=lambda: stdout.append(out.read()))
        reader.start()
        for line in proc.stderr:
            tail.append(line)
            if not args.json:
                print(line, end="", file=sys.stderr, flush=True)
        reader.join()
        returncode = proc.wait()
    if returncode != 0:
        raise RuntimeError(llama_bench_failure(cmd, returncode, "".join(tail), "".join(stdout)))
    rows = json.loads("".join(stdout))
    out = {"command": " ".join(cmd)}
    for r in rows:
        if r["n_prompt"] and not r["n_gen"]:
            out["pp_tokens_per_second"] = r["avg_ts"]
        elif r["n_gen"] and not r["n_prompt"]:
            out["tg_tokens_per_second"] = r["avg_ts"]
    return out


def llama_bench_failure(cmd: list[str], returncode: int, stderr: str, stdout: str) -> str:
    """What to tell the user when llama-bench failed: how it ended, its own last lines, what to try."""
    if returncode < 0:
        import signal

        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    said = "\n".join((stderr.strip() or stdout.strip()).splitlines()[-15:])
    hint = "run the command above by hand to see all of its output"
    if "--repack" not in cmd:
        hint += "; if it crashed in a repacked kernel (AMX), pass --no-repack (llama-bench then gets --repack 0)"
    return (
        f"llama-bench {how}: {' '.join(cmd)}\n"
        + (f"its last output:\n{said}\n" if said else "it printed nothing\n")
        + f"hint: {hint}"
    )


# --- output


def print_table(results: list[dict[str, Any]], reference: dict[str, Any] | None) -> None:
    cols = ("budget", "pp tok/s", "tg tok/s", "hit rate", "tg MiB/tok", "direct", "peak RSS")
    print(" ".join(f"{c:>{w}}" for c, w in zip(cols, (9, 9, 9, 9, 10, 7, 10), strict=True)))
    for r in results:
        hit = f"{r['hit_rate']:.3f}" if "hit_rate" in r else "-"
        moved = f"{r['bytes_per_decode_token'] / MiB:.2f}" if "bytes_per_decode_token" in r else "-"
        direct = f"{r['direct_share']:.0%}" if "direct_share" in r else "-"
        print(
            f"{r['budget']:>9} {r['pp_tokens_per_second']:>9.2f} {r['tg_tokens_per_second']:>9.2f} {hit:>9} "
            f"{moved:>10} {direct:>7} {format_bytes(r['peak_rss_bytes']):>10}"
        )
    if reference:
        print(
            f"{'llama.cpp':>9} {reference.get('pp_tokens_per_second', 0):>9.2f} "
            f"{reference.get('tg_tokens_per_second', 0):>9.2f}   ({reference['command']})"
        )
        for r in results:
            pp = r["pp_tokens_per_second"] / reference["pp_tokens_per_second"]
            tg = r["tg_tokens_per_second"] / reference["tg_tokens_per_second"]
            print(f"  budget {r['budget']}: pymoe / llama.cpp = {pp:.2f}x prefill, {tg:.2f}x decode")


def print_cgroup_peaks(results: list[dict[str, Any]]) -> None:
    """Under a memory cgroup limit: each configuration's peak as the cgroup saw it (page cache included)."""
    for r in results:
        if "cgroup_peak_bytes" in r:
            print(
                f"budget {r['budget']}: cgroup peak {format_bytes(r['cgroup_peak_bytes'])} of its limit "
                f"{format_bytes(r['cgroup_limit_bytes'])} (page cache included; since {r['cgroup_peak_since']})"
            )


def plot(result: dict[str, Any], path: str, model_name: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib; hint: pip install matplotlib (or pymoe[plot])") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = np.asarray(result["expert_pairs"], dtype=float)
    moe_layers = np.where(pairs.sum(axis=1) > 0)[0]
    hits = np.asarray(result["decode_hits"], dtype=float)  # [tokens, layers, 2]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    share = pairs[moe_layers] / np.maximum(pairs[moe_layers].sum(axis=1, keepdims=True), 1)
    im = a.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    a.set_title("expert usage (share of a layer's pairs)")
    a.set_xlabel("expert")
    a.set_ylabel("MoE layer")
    a.set_yticks(range(len(moe_layers)), [str(i) for i in moe_layers] if len(moe_layers) <= 32 else None)
    fig.colorbar(im, ax=a)
    rate = hits[:, moe_layers, 0] / np.maximum(hits[:, moe_layers, 1], 1)
    im2 = b.imshow(rate.T, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    b.set_title(
        f"cache hits per layer over decode tokens (budget {result['budget']}, hit rate {result['hit_rate']:.2f})"
    )
    b.set_xlabel("decode token")
    b.set_ylabel("MoE layer")
    fig.colorbar(im2, ax=b)
    fig.suptitle(model_name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    if args.prompt_tokens < 1 or args.gen_tokens < 1:
        raise ValueError("--prompt-tokens and --gen-tokens must be >= 1")
    summary = summarize(args.model)
    budgets = (
        [b.strip() for b in args.budgets.split(",")]
        if args.budgets
        else ["off" if args.offload == "off" else args.expert_budget]
    )
    if not summary.is_moe and any(b != "off" for b in budgets):
        raise ValueError(f"'{args.model}' is a dense model: there are no experts to offload; use --budgets off")
    if args.replay and "off" in budgets:
        raise ValueError("--replay routes through the offload engine: drop the budget 'off' from --budgets")
    if args.plot and budgets[-1] == "off":
        raise ValueError("--plot draws the cache: make the last budget one with offload on")
    recorder = max((i for i, b in enumerate(budgets) if b != "off"), default=None) if args.record_routing else None
    if args.record_routing and recorder is None:
        raise ValueError("--record-routing needs a budget with offload on; hint: add one to --budgets")

    from tqdm import tqdm

    results = []
    for i, budget in enumerate(tqdm(budgets, desc="configurations", unit="config", disable=args.json, file=sys.stderr)):
        # a fresh process per configuration: its peak memory and page cache use are its own
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(run_one, args, budget, i == recorder).result())
    reference = run_llama_bench(args) if args.vs_llama_cpp else None
    if args.plot:
        plot(results[-1], args.plot, summary.name or Path(args.model).name)
    if args.json:
        slim = [{k: v for k, v in r.items() if k not in ("expert_pairs", "decode_hits", "summary")} for r in results]
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "prompt_tokens": args.prompt_tokens,
                    "gen_tokens": args.gen_tokens,
                    "results": slim,
                    "llama_cpp": reference,
                }
            )
        )
    else:
        print(
            f"{summary.name or args.model}: pp{args.prompt_tokens}, tg{args.gen_tokens}, "
            f"threads {args.n_threads or os.cpu_count()}"
        )
        print_table(results, reference)
        for r in results:
            print(f"\nbudget {r['budget']}:")
            print(textwrap.indent(r["summary"], "  "))
        print_cgroup_peaks(results)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
