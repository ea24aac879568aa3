#!/usr/bin/env python3
"""CPU-only benchmark of the expert-offload engine under a memory limit.

On one synthetic model (tools/make_synthetic_moe.py) at least twice the size
of a cgroup memory limit (page cache counted), measures prefill (a 512-token
prompt, like llama-bench's pp512) and decode (128 tokens from an empty cache,
like tg128) tokens/s of:

  (a) llama-bench (mmap), unconstrained: the ceiling;
  (b) llama-bench (mmap) under the limit, at the read-ahead of the disk that holds the model;
  (r) the same through a read-only loop device over the file (O_DIRECT underneath) whose read-ahead
      is 128 KiB (--loop-read-ahead), the usual kernel default: mmap's reads depend on it;
  (c) pymoe, disk tier, routing replayed from the Mixtral-8x7B decode trace,
      budget = limit - non-expert weights - KV cache - a reserve, under the limit;
  (d) pymoe with offload off, unconstrained: its own ceiling;
  (e) pymoe as (c) but with the model's own (random) router, as llama-bench routes;

then, with --sweep, pymoe's decode under the same limit for several budgets
and policies, and with --ablation, with each technique on and off (CPU
assist, the multidim policy, low-precision copies, prefetching). Every run
is a fresh process placed into its own memory cgroup (pymoe_bench_* in the
cgroup v1 memory hierarchy, or in the cgroup v2 hierarchy when that has the
memory controller) before it opens the model, after the model file has been
evicted from the page cache. pymoe runs are timed by `pymoe.bench.timed_run`,
as `pymoe bench` times them. Reported per run: tokens/s,
hit rate, bytes read from disk per token (the process's read_bytes over the
measured phase; for pymoe also the engine's own count), the disk roofline
(bandwidth / bytes per token, with the bandwidth measured here with O_DIRECT)
and the cgroup's peak memory. Needs root, a memory cgroup controller,
llama-bench for a, b and r (tools/build_llama_tools.sh), root and a loop
device for r, and the Mixtral-8x7B decode trace for c, --sweep and
--ablation (--trace).

Models of 8 GiB and more (the real-size presets mixtral-8x7b, qwen3-30b-a3b)
get a plan that fits ~20 minutes (`plan_defaults`): limit 1/3 of the file;
b, r and c (e instead when the trace does not fit the model's routing shape,
or without --trace); pp16 without warm-up (llama-bench's and pymoe's alike),
llama-bench tg8, pymoe tg32; no retries. A generated model is deleted at the
end unless --keep. Progress lines (stderr) say which run goes and for how long.

    python tools/bench_offload.py --trace T.jsonl      # mixtral-mini, 576 MiB, a, b, r, c, d, e
    python tools/bench_offload.py --preset mixtral-8x7b --trace T.jsonl   # 25 GiB under 1/3 of it
    python tools/bench_offload.py --preset qwen3-30b-a3b                  # 17 GiB under 1/3 of it
    python tools/bench_offload.py --trace T.jsonl --sweep --json out.json
    python tools/bench_offload.py --worker '{...}'     # internal: one pymoe run

Benchmarks, not tests: the numbers depend on the machine (and on whatever
else runs on it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pagecache import cached_bytes, evict  # tools/, beside this script
from readahead import LoopDevice, device_read_ahead, loop_problem, pad_to_sectors

from pymoe._units import GiB, MiB, format_bytes
from pymoe.bench import find_llama_bench, read_bytes, timed_run

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent
TRACE_NAME = "mixtral8x7b-instruct-fp8_humaneval-p0-1_decode.jsonl"  # the Mixtral-8x7B decode trace
PYMOE_MARK = "pymoe-run: "  # the worker's progress lines on stderr
LLAMA_MARK = "llama-bench: benchmark"  # llama-bench --progress's


# --------------------------------------------------------------------- memory, page cache, cgroups


def memory_hierarchy() -> tuple[int, Path] | None:
    """Where memory cgroups are made here, read from /proc/self/mounts: (1, the cgroup v1 memory
    hierarchy) or (2, the cgroup v2 hierarchy when it has the memory controller), as
    pymoe.offload.available_memory reads either; None without a memory controller."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        mount, fstype, options = Path(fields[1]), fields[2], fields[3].split(",")
        if fstype == "cgroup" and "memory" in options:
            return 1, mount
        if fstype == "cgroup2":
            with contextlib.suppress(OSError):
                if "memory" in (mount / "cgroup.controllers").read_text().split():
                    unified = mount
    return (2, unified) if unified is not None else None


class MemCgroup:
    """A memory cgroup for one run (cgroup v1 or v2, see `memory_hierarchy`): `limit` bytes
    (None: no limit, only accounting). Removed on exit; processes left in it are killed."""

    _n = 0
    # v1 / v2 interface files
    LIMIT: ClassVar = {1: "memory.limit_in_bytes", 2: "memory.max"}
    PEAK: ClassVar = {1: "memory.max_usage_in_bytes", 2: "memory.peak"}

    def __init__(self, limit: int | None) -> None:
        found = memory_hierarchy()
        if found is None:
            raise RuntimeError("no memory cgroup controller; hint: run where cgroup v1 or v2 has the memory controller")
        self.version, root = found
        MemCgroup._n += 1
        self.root = root
        self.path = root / f"pymoe_bench_{os.getpid()}_{MemCgroup._n}"
        self.limit = limit

    def __enter__(self) -> MemCgroup:
        if self.version == 2:
            control = self.root / "cgroup.subtree_control"
            if "memory" not in control.read_text().split():
                control.write_text("+memory")  # the children of the root get the memory controller
        self.path.mkdir()
        if self.limit is not None:
            (self.path / self.LIMIT[self.version]).write_text(str(self.limit))
        return self

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def peak(self) -> int:
        """The most memory the cgroup used (page cache included)."""
        name = self.PEAK[self.version]
        if not (self.path / name).is_file():
            raise RuntimeError(f"{self.path} has no {name}; hint: cgroup v2 reports peaks from Linux 5.19 on")
        return int(self.read(name))

    def _events(self) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in self.read("memory.events").splitlines())}

    def failcnt(self) -> int:
        """How often the cgroup hit its limit."""
        return int(self.read("memory.failcnt")) if self.version == 1 else self._events().get("max", 0)

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the cgroup for memory."""
        if self.version == 1:
            return "oom_kill 1" in self.read("memory.oom_control")
        return self._events().get("oom_kill", 0) > 0

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):
            pids = [int(p) for p in self.read("cgroup.procs").split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove {self.path}", file=sys.stderr)


def cpu_pressure_total() -> int | None:
    """Microseconds during which some task waited for a CPU (PSI, whole machine)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(line.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def others_share(seconds: float = 2.0) -> float:
    """Share of the machine's CPUs busy now while this driver sleeps: other people's jobs."""
    b0, t0 = machine_busy_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (machine_busy_seconds() - b0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


def wait_for_quiet_cpu(max_wait: float, threshold: float) -> float:
    """Waits (at most `max_wait` s) until other jobs use less than `threshold`
    of the machine's CPUs: the benchmark shares its cores with other people's work."""
    end = time.monotonic() + max_wait
    while True:
        share = others_share()
        if share < threshold or time.monotonic() >= end:
            return share


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    read_bytes: int  # block-device reads of the whole process (rusage inblock * 512)
    max_rss: int
    timed_out: bool
    cpu_seconds: float  # user + system time of the process, all threads
    cpu_pressure: float | None  # share of the run's wall time some task (anyone's) waited for a CPU
    others_cpu: float  # share of the machine's CPUs used by other processes during the run
    marks: list[tuple[str, float, int | None]] = field(default_factory=list)  # (stderr line, time, read_bytes)


def run_in_cgroup(
    argv: list[str],
    cg: MemCgroup,
    timeout: float,
    mark_prefix: str | None = None,
    progress: Any = None,
    progress_every: float = 30.0,
) -> Finished:
    """Runs `argv` inside `cg` (the process joins the cgroup before exec, so
    before it opens anything) and waits for it with a timeout. Stderr lines
    starting with `mark_prefix` are time-stamped with the process's read_bytes;
    `progress(seconds so far, the last such line or None)` is called every
    `progress_every` seconds while it runs."""
    wrapper = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg.path / "cgroup.procs"), *argv]
    psi0, busy0, self0 = cpu_pressure_total(), machine_busy_seconds(), self_cpu_seconds()
    t0 = time.perf_counter()
    proc = subprocess.Popen(wrapper, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.daemon = True
    timer.start()
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    err: list[str] = []
    marks: list[tuple[str, float, int | None]] = []
    done = threading.Event()

    def beat() -> None:
        while not done.wait(progress_every):
            progress(time.perf_counter() - t0, marks[-1][0] if marks else None)

    if progress is not None:
        threading.Thread(target=beat, daemon=True).start()
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            err.append(line)
            if mark_prefix and line.startswith(mark_prefix):
                marks.append((line.strip(), time.perf_counter() - t0, read_bytes(proc.pid)))
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: the caller's cgroup exit kills what is left
        kill()
        raise
    finally:
        timer.cancel()
        done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    wall = time.perf_counter() - t0
    psi1, busy1, self1 = cpu_pressure_total(), machine_busy_seconds(), self_cpu_seconds()
    others = (busy1 - busy0) - (ru.ru_utime + ru.ru_stime) - (self1 - self0)
    return Finished(
        proc.returncode,
        "".join(out),
        "".join(err),
        wall,
        ru.ru_inblock * 512,
        ru.ru_maxrss * 1024,
        timed_out.is_set(),
        ru.ru_utime + ru.ru_stime,
        (psi1 - psi0) / 1e6 / wall if psi0 is not None and psi1 is not None else None,
        max(0.0, others / (wall * (os.cpu_count() or 1))),
        marks,
    )


# --------------------------------------------------------------------- disk bandwidth


def disk_bandwidth(path: Path, seconds: float = 1.5, patterns: tuple[str, ...] | None = None) -> dict[str, float]:
    """O_DIRECT reads of the model file: sequential (8 MiB requests, one at a
    time) and at random 4 KiB-aligned offsets (1 MiB and 3 MiB requests, one
    at a time and 4 in flight, as the engine's 4 read threads issue them)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    bufs = [mmap.mmap(-1, 8 * MiB) for _ in range(4)]
    rng = random.Random(0)

    def read(off: int, n: int, b: int) -> int:
        return os.preadv(fd, [memoryview(bufs[b])[:n]], off)

    def seq(chunk: int) -> float:
        t0, got, off = time.perf_counter(), 0, 0
        while time.perf_counter() - t0 < seconds:
            if off + chunk > size:
                off = 0
            got += read(off, chunk, 0)
            off += chunk
        return got / (time.perf_counter() - t0)

    def rand(chunk: int, depth: int) -> float:
        def worker(i: int) -> int:
            got, end = 0, t0 + seconds
            while time.perf_counter() < end:
                got += read(rng.randrange(0, (size - chunk) // 4096) * 4096, chunk, i)
            return got

        t0 = time.perf_counter()
        with ThreadPoolExecutor(depth) as ex:
            got = sum(ex.map(worker, range(depth)))
        return got / (time.perf_counter() - t0)

    runs = {
        "seq_8MiB_qd1": lambda: seq(8 * MiB),
        "rand_1MiB_qd1": lambda: rand(MiB, 1),
        "rand_1MiB_qd4": lambda: rand(MiB, 4),
        "rand_3MiB_qd4": lambda: rand(3 * MiB, 4),
    }
    try:
        return {k: f() for k, f in runs.items() if patterns is None or k in patterns}
    finally:
        os.close(fd)


# --------------------------------------------------------------------- the pymoe worker (runs in the cgroup)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One pymoe run: load, then `pymoe.bench.timed_run` (warm-up and timing as llama-bench's);
    returns a JSON-able dict."""
    io0 = read_bytes()
    t0 = time.perf_counter()
    print(f"{PYMOE_MARK}loading", file=sys.stderr, flush=True)
    import pymoe
    from pymoe.traces import load_trace

    kw: dict[str, Any] = {"n_ctx": spec["n_ctx"], "n_threads": spec["threads"], "n_batch": 512, "n_ubatch": 512}
    kw["repack"] = spec.get("repack", False)
    if spec["offload"]:
        kw.update(offload="on", expert_budget=spec["budget"], policy=spec["policy"], offload_tier="disk")
        kw.update(spec.get("engine") or {})  # the ablation's switches: sidecar, prefetch, cpu_assist
        if spec.get("replay"):
            s = pymoe.summarize(spec["model"])
            # the trace's gate weights too: the planner's mixed-precision choices follow a real router's
            kw["replay"] = load_trace(spec["replay"]).fit_routes(s.n_layer, s.n_expert, s.n_expert_used)
    else:
        kw["offload"] = "off"
    m = pymoe.Model(spec["model"], **kw)
    load_s, io_load = time.perf_counter() - t0, read_bytes()
    n, pp = spec["tokens"], spec["mode"] == "pp"

    def progress(phase: str, done: int, total: int) -> None:
        print(f"{PYMOE_MARK}{phase} {done}/{total}", file=sys.stderr, flush=True)

    run = timed_run(
        m, n_prompt=n if pp else 0, n_gen=0 if pp else n, reps=spec["reps"], warmup=spec["warmup"], progress=progress
    )
    times = run.pp_seconds if pp else run.tg_seconds
    st = m.offload_stats()
    out = {
        "load_seconds": load_s,
        "seconds": times,
        "tokens_per_second": [n / t for t in times],
        "read_bytes_load": (io_load or 0) - (io0 or 0),
        "read_bytes_measured": run.read_bytes or 0,
        "measured_tokens": n * spec["reps"],
        "cpu_util_measured": run.cpu_seconds / run.wall_seconds,
        "offload": {k: v for k, v in st.items() if k != "per_layer"} if st else None,
        "budget": m.offload.budget if m.offload.enabled else None,
        "offload_reason": m.offload.reason,
    }
    m.close()
    return out


# --------------------------------------------------------------------- runs


def llama_bench_argv(
    exe: str | Path, model: str | Path, threads: int, mode: str, tokens: int, reps: int, warmup: bool, repack: bool
) -> list[str]:
    """llama-bench with mmap, as the runs give it: `--repack 0` when pymoe runs without repacking,
    `--no-warmup` when pymoe runs without a warm-up."""
    argv = [str(exe), "-m", str(model), "-t", str(threads), "-fa", "off", "-lm", "mmap"]
    argv += [] if repack else ["--repack", "0"]
    argv += ["-r", str(reps), "-o", "json", "--progress"] + ([] if warmup else ["--no-warmup"])
    return argv + (["-p", str(tokens), "-n", "0"] if mode == "pp" else ["-p", "0", "-n", str(tokens)])


@dataclass
class RunResult:
    config: str
    what: str
    mode: str  # pp | tg
    limit: int | None
    tokens: int
    command: str
    tokens_per_second: float | None = None
    tps_samples: list[float] = field(default_factory=list)
    hit_rate: float | None = None
    read_bytes_per_token: float | None = None  # from the disk, measured phase
    engine_bytes_per_token: float | None = None  # bytes the engine read into slots or through the mapping
    peak_memory: int | None = None
    budget: int | None = None
    policy: str | None = None
    seconds: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace, model: Path, started: float | None = None) -> None:
        self.args = args
        self.model = model
        self.started = time.monotonic() if started is None else started
        self.deadline = self.started + args.max_minutes * 60
        self.results: list[RunResult] = []
        self.bw = 0.0  # the bandwidth of the roofline column
        self.head: dict[str, Any] = {}  # the JSON report's fields besides the results
        self.read_ahead: tuple[str, int] | None = None  # (device, read_ahead_kb) that holds the model
        self.loop: LoopDevice | None = None  # for r
        self.loop_problem = "no loop device was set up"
        self.n_runs = 0  # runs planned (progress lines)
        self.n_started = 0

    def clock(self) -> str:
        s = int(time.monotonic() - self.started)
        return f"[{s // 60:3d}:{s % 60:02d}]"

    def announce(self, res: RunResult) -> None:
        """A progress line (stderr): which run starts, and when."""
        self.n_started += 1
        of = f"/{self.n_runs}" if self.n_runs >= self.n_started else ""
        print(
            f"{self.clock()} run {self.n_started}{of}: {res.config} {res.what} {res.mode}{res.tokens}",
            file=sys.stderr,
            flush=True,
        )

    def heartbeat(self, res: RunResult) -> Any:
        def beat(seconds: float, mark: str | None) -> None:
            where = f", {mark.removeprefix(PYMOE_MARK).removeprefix('llama-bench: ')}" if mark else ""
            print(
                f"{self.clock()}   {res.config} {res.mode}{res.tokens}: {seconds:.0f} s{where}",
                file=sys.stderr,
                flush=True,
            )

        return beat

    def timeout(self, want: float) -> float:
        return max(10.0, min(want, self.deadline - time.monotonic()))

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline - 15

    def prepare(self, res: RunResult) -> None:
        res.extra["others_cpu_before"] = wait_for_quiet_cpu(self.args.quiet_wait, self.args.max_others / 100)
        # the disk's bandwidth varies over time here (a shared virtual disk): measure it beside each run
        bw = disk_bandwidth(self.model, 0.5, ("seq_8MiB_qd1", "rand_3MiB_qd4"))
        res.extra["disk_bandwidth_before"] = max(bw.values())
        evict(self.model)
        res.extra["cached_before"] = cached_bytes(self.model)

    @staticmethod
    def note_process(res: RunResult, fin: Finished) -> None:
        res.seconds = fin.seconds
        res.extra["cpu_util"] = fin.cpu_seconds / fin.seconds
        res.extra["cpu_pressure"] = fin.cpu_pressure
        res.extra["others_cpu"] = fin.others_cpu
        res.extra["read_bytes_total"] = fin.read_bytes
        res.extra["max_rss"] = fin.max_rss

    def llama_bench(
        self, config: str, mode: str, limit: int | None, tokens: int, reps: int, *, warmup: bool = True
    ) -> RunResult:
        """llama-bench on the model file (a, b) or, for r, on the loop device over it."""
        a = self.args
        loop = config == "r"
        source = self.loop.device if loop and self.loop else str(self.model)
        argv = llama_bench_argv(a.llama_bench, source, a.threads, mode, tokens, reps, warmup, a.repack)
        if loop:
            kb: int | None = self.loop.read_ahead_kb if self.loop else a.loop_read_ahead
        else:
            kb = self.read_ahead[1] if self.read_ahead else None
        ra = f"read-ahead {kb if kb is not None else '?'} KiB" + (" (loop)" if loop else "")
        what = "llama-bench (mmap)" + (f", limit, {ra}" if limit else ", unconstrained")
        res = RunResult(config, what, mode, limit, tokens, " ".join(argv).replace(str(ROOT) + "/", ""))
        res.extra["read_ahead_kb"] = kb
        if self.out_of_time():
            res.error = "skipped: out of time"
            return res
        if loop and self.loop is None:
            res.error = f"skipped: {self.loop_problem}"
            return res
        self.announce(res)
        self.prepare(res)
        if loop:
            self.loop.flush()  # the loop device's own page cache (the file's is not used: O_DIRECT)
            res.extra["cached_before"] += cached_bytes(Path(self.loop.device)) or 0
        with MemCgroup(limit) as cg:
            fin = run_in_cgroup(
                argv, cg, self.timeout(a.run_timeout), LLAMA_MARK, self.heartbeat(res), a.progress_every
            )
            res.peak_memory = cg.peak()
            res.extra["failcnt"] = cg.failcnt()
        self.note_process(res, fin)
        res.extra["marks"] = fin.marks
        if fin.timed_out or fin.returncode != 0:
            res.error = "timed out" if fin.timed_out else f"exit {fin.returncode}: {fin.stderr.strip()[-300:]}"
            return res
        rows = json.loads(fin.stdout)
        row = rows[0]
        res.tps_samples = [float(x) for x in row.get("samples_ts", [])]
        res.tokens_per_second = float(row["avg_ts"])
        # bytes read from the start of the first measured repetition to the end
        first = next((m for m in fin.marks if "prompt run 1/" in m[0] or "generation run 1/" in m[0]), None)
        if first and first[2] is not None:
            res.read_bytes_per_token = (fin.read_bytes - first[2]) / (tokens * reps)
            res.extra["read_bytes_load_and_warmup"] = first[2]
        return res

    def pymoe(
        self,
        config: str,
        what: str,
        mode: str,
        limit: int | None,
        tokens: int,
        reps: int,
        *,
        warmup: bool = True,
        offload: bool = True,
        budget: int | str | None = None,
        policy: str = "lru",
        replay: bool = True,
        engine: dict[str, Any] | None = None,
    ) -> RunResult:
        a = self.args
        spec = {
            "model": str(self.model),
            "mode": mode,
            "tokens": tokens,
            "reps": reps,
            "n_ctx": tokens if mode == "pp" else tokens + 1,
            "threads": a.threads,
            "offload": offload,
            "budget": budget,
            "policy": policy,
            "replay": str(a.trace) if (offload and replay) else None,
            "engine": engine or {},
            "warmup": warmup,
            "repack": a.repack,
        }
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        command = "pymoe.Model(" + ", ".join(
            [f"offload={'on' if offload else 'off'}"]
            + ([f"expert_budget={budget}", f"policy={policy}", "offload_tier=disk"] if offload else [])
            + (["replay=<mixtral decode trace>"] if spec["replay"] else [])
            + [f"{k}={Path(v).name if k == 'sidecar' else v}" for k, v in (engine or {}).items()]
            + [f"n_threads={a.threads}", f"repack={a.repack}"]
        )
        command += f") {mode}{tokens} x{reps}" + ("" if warmup else ", no warm-up")
        res = RunResult(config, what, mode, limit, tokens, command, policy=policy if offload else None)
        if self.out_of_time():
            res.error = "skipped: out of time"
            return res
        self.announce(res)
        self.prepare(res)
        with MemCgroup(limit) as cg:
            fin = run_in_cgroup(
                argv, cg, self.timeout(a.run_timeout), PYMOE_MARK, self.heartbeat(res), a.progress_every
            )
            res.peak_memory = cg.peak()
            res.extra["failcnt"] = cg.failcnt()
            res.extra["oom_kill"] = cg.oom_killed()
        self.note_process(res, fin)
        if fin.timed_out or fin.returncode != 0:
            why = "timed out" if fin.timed_out else f"exit {fin.returncode}"
            if res.extra.get("oom_kill") or fin.returncode == -9:
                why += " (killed: out of memory in the cgroup?)"
            res.error = why + (": " + fin.stderr.strip()[-300:] if fin.stderr.strip() else "")
            return res
        w = json.loads(fin.stdout.strip().splitlines()[-1])
        res.tps_samples = w["tokens_per_second"]
        res.tokens_per_second = w["measured_tokens"] / sum(w["seconds"])
        res.read_bytes_per_token = w["read_bytes_measured"] / w["measured_tokens"]
        res.budget = w["budget"]
        st = w["offload"]
        if st:
            res.hit_rate = st["hit_rate"]
            moved = st["bytes_loaded"] + st["bytes_direct"] + st.get("bytes_loaded_lo", 0) + st.get("prefetch_bytes", 0)
            res.engine_bytes_per_token = moved / w["measured_tokens"]
            keys = ("hits", "misses", "loads", "direct", "bytes_loaded", "bytes_direct", "load_seconds", "plan_seconds")
            keys += ("n_slots", "read_bandwidth", "evictions", "hits_lo", "loads_lo", "bytes_loaded_lo")
            keys += ("lo_share_of_pairs", "upgrades", "prefetch_bytes", "prefetch_precision", "prefetch_recall")
            keys += ("prefetch_wait_seconds", "prefetch_busy_seconds")
            res.extra["engine"] = {k: st[k] for k in keys if k in st}
        res.extra["load_seconds"] = w["load_seconds"]
        res.extra["cpu_util_measured"] = w["cpu_util_measured"]
        res.extra["read_bytes_load"] = w["read_bytes_load"]
        return res

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> RunResult:
        """`fn(*args, **kwargs)` as best_of, printed and kept."""
        r = self.best_of(lambda: fn(*args, **kwargs))
        self.add(r)
        return r

    def best_of(self, make: Any) -> RunResult:
        """Runs `make()` until a run was not disturbed by other jobs on the
        machine (other processes used <= --max-others %% of the CPUs) or
        --retries are spent; keeps the least disturbed run and records every attempt."""
        attempts: list[RunResult] = []
        for _ in range(1 + self.args.retries):
            r = make()
            attempts.append(r)
            o = r.extra.get("others_cpu")
            if r.error or o is None or o * 100 <= self.args.max_others or self.out_of_time():
                break
        ok = [r for r in attempts if not r.error] or attempts
        best = min(ok, key=lambda r: r.extra.get("others_cpu") or 0.0)
        best.extra["attempts"] = [
            {"tokens_per_second": r.tokens_per_second, "others_cpu": r.extra.get("others_cpu"), "error": r.error}
            for r in attempts
        ]
        return best

    def add(self, r: RunResult) -> None:
        self.results.append(r)
        print(format_row(r, self.bw), flush=True)
        self.save()

    def save(self) -> None:
        """Writes the JSON report (after every run, so that an interrupted benchmark keeps its results)."""
        if self.args.json:
            report = {**self.head, "results": [asdict(r) for r in self.results]}
            self.args.json.write_text(json.dumps(report, indent=1))


# --------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


HEADER = (
    f"{'cfg':<4} {'run':<56} {'mode':<6} {'tok/s':>8} {'hit':>5} {'MiB/tok':>8} {'eng MiB/tok':>11} "
    f"{'roofline':>8} {'peak MiB':>8} {'others':>6}"
)


def format_row(r: RunResult, bw: float) -> str:
    bw = r.extra.get("disk_bandwidth_before") or bw
    if r.error:
        return f"{r.config:<4} {r.what[:56]:<56} {r.mode + str(r.tokens):<6} {r.error[:120]}"
    roof = bw / r.read_bytes_per_token if r.read_bytes_per_token and r.read_bytes_per_token > MiB / 8 else None
    return (
        f"{r.config:<4} {r.what[:56]:<56} {r.mode + str(r.tokens):<6} {_fmt(r.tokens_per_second, '.2f'):>8} "
        f"{_fmt(r.hit_rate, '.2f'):>5} {_fmt((r.read_bytes_per_token or 0) / MiB, '.1f'):>8} "
        f"{_fmt(r.engine_bytes_per_token / MiB if r.engine_bytes_per_token is not None else None, '.1f'):>11} "
        f"{_fmt(roof, '.1f', 'inf'):>8} {_fmt((r.peak_memory or 0) / MiB, '.0f'):>8} "
        f"{_fmt(r.extra.get('others_cpu'), '.0%'):>6}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The tables of a --json report, as Markdown (docs/benchmarks.md)."""
    bw = report["roofline_bandwidth"]
    lines = []
    ra, loop = report.get("read_ahead"), report.get("loop")
    if ra or loop or "roofline_no_cache" in report:
        disk = f"`read_ahead_kb` {ra['read_ahead_kb']} ({ra['device']})" if ra else "`read_ahead_kb` unknown"
        if loop:
            disk += f", r's loop device {loop['read_ahead_kb']} (direct-io {'on' if loop['direct_io'] else 'off'})"
        disk += f"; O_DIRECT bandwidth {bw / 1e9:.2f} GB/s"
        if "roofline_no_cache" in report:
            disk += f"; roofline with no expert in memory {report['roofline_no_cache']:.2f} tok/s"
        lines += [f"Disk: {disk}; limit {report['limit'] / MiB:.0f} MiB.", ""]
    lines += [
        "| cfg | run | test | tok/s | hit rate | disk MiB/token | engine MiB/token | disk GB/s | roofline tok/s | "
        "engine ms/token: read + plan / rest | peak MiB | others' CPU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        x = r["extra"]
        test = f"{r['mode']}{r['tokens']}"
        if r["error"]:
            lines.append(f"| {r['config']} | {r['what']} | {test} | {r['error'][:60]} | | | | | | | | |")
            continue
        rb = r["read_bytes_per_token"]
        eng = r["engine_bytes_per_token"]
        run_bw = x.get("disk_bandwidth_before") or bw
        roof = _fmt(run_bw / rb, ".1f") if rb and rb > MiB / 8 else "-"
        budget = f" (budget {r['budget'] / MiB:.0f} MiB)" if r.get("budget") is not None and r["config"] != "s" else ""
        split = "-"
        if x.get("engine") and r["tokens_per_second"]:
            n = r["tokens"]  # engine runs are one repetition
            io = (x["engine"]["load_seconds"] + x["engine"]["plan_seconds"]) / n * 1e3
            split = f"{io:.0f} / {1e3 / r['tokens_per_second'] - io:.0f}"
        lines.append(
            f"| {r['config']} | {r['what']}{budget} | {test} | {r['tokens_per_second']:.2f} | "
            f"{_fmt(r['hit_rate'], '.2f')} | {_fmt(rb / MiB if rb is not None else None, '.1f')} | "
            f"{_fmt(eng / MiB if eng is not None else None, '.1f')} | {run_bw / 1e9:.2f} | {roof} | {split} | "
            f"{r['peak_memory'] / MiB:.0f} | "
            f"{_fmt(x.get('others_cpu'), '.0%')} |"
        )
    ablation_rows = [r for r in report["results"] if r["config"] == "x"]
    if ablation_rows:
        lines += [
            "",
            "| ablation (decode under the limit) | tok/s | hit rate | engine MiB/token | low-precision pairs | "
            "prefetch precision / recall | prefetch wait ms/token | others' CPU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ablation_rows:
            if r["error"]:
                lines.append(f"| {r['what']} | {r['error'][:60]} | | | | | | |")
                continue
            e = r["extra"].get("engine", {})
            n = r["tokens"]
            pf = "-"
            if e.get("prefetch_precision") is not None and (e.get("prefetch_bytes") or 0) > 0:
                pf = f"{e['prefetch_precision']:.2f} / {e['prefetch_recall']:.2f}"
            wait = _fmt(e["prefetch_wait_seconds"] / n * 1e3, ".1f") if e.get("prefetch_bytes") else "-"
            lines.append(
                f"| {r['what'].removeprefix('ablation: ')} | {r['tokens_per_second']:.2f} | "
                f"{_fmt(r['hit_rate'], '.2f')} | {_fmt(r['engine_bytes_per_token'] / MiB, '.1f')} | "
                f"{_fmt(e.get('lo_share_of_pairs'), '.0%')} | {pf} | {wait} | "
                f"{_fmt(r['extra'].get('others_cpu'), '.0%')} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    from pymoe.offload import parse_size as ps

    return ps(text)


def parse_limit(text: str, model_bytes: int) -> int:
    """The memory limit: a size ('576MiB', '8GiB') or a share of the model file ('1/3', '0.33', '33%')."""
    t = str(text).strip()
    hint = "hint: write a size (576MiB, 8GiB) or a share of the model file (1/3, 0.33, 33%)"
    share: float | None = None
    try:
        if "/" in t:
            num, _, den = t.partition("/")
            share = float(num) / float(den)
        elif t.endswith("%"):
            share = float(t[:-1]) / 100
        elif re.fullmatch(r"[0-9]*\.?[0-9]+", t) and float(t) <= 1:
            share = float(t)
        else:
            limit = parse_size(t)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot read {text!r} as a memory limit; {hint}") from None
    if share is not None:
        if not 0 < share <= 1:
            raise ValueError(f"a memory limit given as a share of the model must be in (0, 1], got {text!r}; {hint}")
        limit = int(model_bytes * share)
    if limit <= 0:
        raise ValueError(f"the memory limit must be more than 0, got {text!r}; {hint}")
    return limit


SPARE = 1 * GiB  # left free on the disk that receives a generated model


def disk_room_problem(folder: Path, need: int, what: str) -> str | None:
    """Why `folder` cannot take `need` more bytes (keeping SPARE free); None when it can."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free >= need + SPARE:
        return None
    return (
        f"{folder} has {format_bytes(free)} free; {what} needs {format_bytes(need)} there "
        f"(and {format_bytes(SPARE)} left to spare): {format_bytes(need + SPARE - free)} more; hint: free that much, "
        "pass --workdir DIR on a disk with room (not a tmpfs: the runs must read from the disk), or --model FILE"
    )


LARGE_MODEL = 8 * GiB  # models from this size on (the real-size presets) get LARGE_PLAN's defaults
SMALL_PLAN: dict[str, Any] = {
    "limit": "576MiB",
    "reserve": "128MiB",
    "configs": "a,b,r,c,d,e",
    "pp": 512,
    "tg": 128,
    "tg_limited": 16,
    "prefill_warmup": True,
    "retries": 2,
    "run_timeout": 240.0,
}
# ~20 minutes for Mixtral-8x7B's 25 GiB: llama-bench decodes at ~0.1-0.2 tok/s under the limit, pymoe's
# prefill at ~0.2; a warm-up of a pp16 would double its time
LARGE_PLAN: dict[str, Any] = {
    "limit": "1/3",
    "reserve": "512MiB",  # llama.cpp's compute buffers grow with the vocabulary and hidden size
    "configs": "b,r,c",  # no unconstrained runs: the model need not fit in memory
    "pp": 16,
    "tg": 32,
    "tg_limited": 8,
    "prefill_warmup": False,
    "retries": 0,
    "run_timeout": 420.0,
}
CONFIGS = "abrcde"


def plan_defaults(args: argparse.Namespace, model_bytes: int, trace_fits: bool) -> bool:
    """Fills the options left unset with SMALL_PLAN's or (for a model of LARGE_MODEL or more) LARGE_PLAN's
    values; a large model's pymoe run replays the trace when it fits the model (`trace_fits`), else it
    uses the model's own router (e). Returns whether the model counts as large."""
    large = model_bytes >= LARGE_MODEL
    for key, value in (LARGE_PLAN if large else SMALL_PLAN).items():
        if getattr(args, key) is None:
            if key == "configs" and large and not trace_fits:
                value = value.replace("c", "e")
            setattr(args, key, value)
    return large


@dataclass(frozen=True)
class Planned:
    config: str  # one of CONFIGS
    mode: str  # pp | tg
    tokens: int
    reps: int
    warmup: bool


def plan_runs(args: argparse.Namespace) -> list[Planned]:
    """The runs of --configs x --modes, in order: per mode a, b, r, c, d, e."""
    configs = args.configs.split(",")
    plan = []
    for mode in args.modes.split(","):
        pp = mode == "pp"
        for c in CONFIGS:
            if c not in configs:
                continue
            tokens = args.tg_limited if c in "br" and not pp else (args.pp if pp else args.tg)
            plan.append(Planned(c, mode, tokens, args.reps if c in "ad" else 1, args.prefill_warmup or not pp))
    return plan


def execute(bench: Bench, p: Planned, limit: int, budget: int) -> RunResult:
    if p.config in "abr":
        return bench.run(
            bench.llama_bench, p.config, p.mode, None if p.config == "a" else limit, p.tokens, p.reps, warmup=p.warmup
        )
    what, kw = {
        "c": ("pymoe disk tier, replayed trace, under the limit", {"budget": budget}),
        "d": ("pymoe offload off, unconstrained", {"offload": False}),
        "e": ("pymoe disk tier, own router, under the limit", {"budget": budget, "replay": False}),
    }[p.config]
    lim = None if p.config == "d" else limit
    return bench.run(bench.pymoe, p.config, what, p.mode, lim, p.tokens, p.reps, warmup=p.warmup, **kw)


def setup_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--preset",
        default="mixtral-mini",
        help="synthetic model preset (tools/make_synthetic_moe.py --list); the real-size mixtral-8x7b and\n"
        "qwen3-30b-a3b get the short plan of models of 8 GiB and more",
    )
    ap.add_argument("--model", type=Path, help="use this GGUF instead of generating one (kept)")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / "build" / "bench",
        help="where the model is generated (default: build/bench in this checkout; not a tmpfs: the runs read it "
        "from the disk)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated model (default: deleted at the end)")
    ap.add_argument(
        "--limit",
        help="cgroup memory limit (page cache counted): a size (576MiB, 8GiB) or a share of the model file\n"
        "(1/3, 0.33, 33%%); default 576MiB, 1/3 for models of 8 GiB and more",
    )
    ap.add_argument(
        "--reserve",
        help="pymoe budget = limit - non-expert weights - KV - reserve (default 128MiB; 512MiB for 8 GiB and more)",
    )
    ap.add_argument(
        "--trace",
        type=Path,
        help=f"the routing trace to replay, for c, --sweep and --ablation: the Mixtral-8x7B decode trace {TRACE_NAME}",
    )
    ap.add_argument(
        "--llama-bench",
        metavar="PATH",
        help="llama-bench for a, b and r (default: as `pymoe bench --vs-llama-cpp` finds it: $PYMOE_LLAMA_BENCH, "
        "build/llama-tools/bin/ of the checkout you run from, PATH)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, help="prompt tokens (prefill; default 512, 16 for 8 GiB and more)")
    ap.add_argument("--tg", type=int, help="generated tokens (decode; default 128, 32 for 8 GiB and more)")
    ap.add_argument(
        "--tg-limited", type=int, help="decode tokens of llama-bench under the limit, b and r (default 16; 8)"
    )
    ap.add_argument(
        "--prefill-warmup",
        action=argparse.BooleanOptionalAction,
        help="warm up before a timed prefill, llama-bench and pymoe alike (default: yes; no for 8 GiB and more)",
    )
    ap.add_argument(
        "--repack",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="let llama.cpp repack the dense weights, pymoe and llama-bench alike (default: no, and llama-bench\n"
        "gets --repack 0)",
    )
    ap.add_argument("--reps", type=int, default=2, help="repetitions of unconstrained runs")
    ap.add_argument(
        "--configs",
        help="which of a,b,r,c,d,e to run (default a,b,r,c,d,e; for 8 GiB and more b,r,c, or b,r,e when the trace\n"
        "does not fit the model's routing shape or there is none)",
    )
    ap.add_argument("--modes", default="pp,tg")
    ap.add_argument(
        "--loop-read-ahead",
        type=int,
        default=128,
        metavar="KB",
        help="read_ahead_kb of r's loop device (default: %(default)s, the usual kernel default)",
    )
    ap.add_argument("--sweep", action="store_true", help="also decode under the limit for several budgets/policies")
    ap.add_argument("--sweep-budgets", default="0,64MiB,128MiB,192MiB,256MiB,320MiB,auto")
    ap.add_argument("--sweep-policies", default="lru,lfu")
    ap.add_argument("--sweep-tokens", type=int, default=64)
    ap.add_argument(
        "--ablation",
        action="store_true",
        help="also decode under the limit with each technique on and off: CPU assist (Fiddler), the multidim\n"
        "policy, low-precision copies (a --lo-type sidecar, built here), prefetching",
    )
    ap.add_argument("--lo-type", default="q2_K", help="the ablation's sidecar type (default: %(default)s)")
    ap.add_argument("--run-timeout", type=float, help="seconds per run (default 240; 420 for 8 GiB and more)")
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=20.0,
        help="time budget from the start (generating the model included): runs left when it is spent are skipped",
    )
    ap.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines of a run")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="wait up to this long for a quiet CPU per run")
    ap.add_argument(
        "--max-others",
        type=float,
        default=10.0,
        help="retry a run when other processes used more than this %% of the CPUs",
    )
    ap.add_argument(
        "--retries", type=int, help="re-runs of a run disturbed by other jobs (default 2; 0 for 8 GiB and more)"
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="print the tables of a --json report as Markdown")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def needs_trace(args: argparse.Namespace) -> bool:
    """Whether a run replays the trace: (c), the sweep and the ablation's replayed rows."""
    return "c" in args.configs.split(",") or args.sweep or args.ablation


def check_environment(args: argparse.Namespace) -> str | None:
    if os.geteuid() != 0:
        return "needs root (memory cgroups)"
    if memory_hierarchy() is None:
        return "no memory cgroup controller (cgroup v1 memory, or cgroup v2 with the memory controller)"
    if any(c in args.configs.split(",") for c in "abr"):
        try:
            args.llama_bench = find_llama_bench(args.llama_bench)
        except FileNotFoundError as e:
            return str(e)
    return None


def check_plan(args: argparse.Namespace, trace_fits: bool, why_not: str | None) -> str | None:
    """Problems with what was asked, before anything runs (the trace: `trace_fits`, else `why_not`)."""
    bad = [c for c in args.configs.split(",") if c not in CONFIGS]
    if bad or not args.configs:
        return f"unknown configuration(s) {','.join(bad)!r}; hint: --configs takes some of {','.join(CONFIGS)}"
    if any(m not in ("pp", "tg") for m in args.modes.split(",")):
        return f"--modes {args.modes!r}: hint: pp, tg or pp,tg"
    if needs_trace(args) and not trace_fits:
        return f"configuration c, --sweep and --ablation replay a routing trace: {why_not}"
    return None


def model_shape(args: argparse.Namespace, synth: Any, pymoe: Any) -> tuple[int, int, int]:
    """(bytes, experts per layer, experts per token) of --model, or of the preset before it is written."""
    if args.model:
        if not args.model.is_file():
            raise FileNotFoundError(f"{args.model} does not exist; hint: pass a GGUF file, or leave --model out")
        s = pymoe.summarize(args.model)
        return args.model.stat().st_size, s.n_expert, s.n_expert_used
    p = synth.resolve(args.preset)
    return synth.sizes(p).total, p.n_expert, p.n_expert_used


def trace_fit(trace: Path | None, n_expert: int, k: int) -> tuple[bool, str | None]:
    """Whether the trace can be replayed on a model routing top-k of n_expert; else why not."""
    if trace is None:
        return False, f"hint: pass --trace {TRACE_NAME}"
    if not trace.is_file():
        return False, f"trace {trace} is missing; hint: pass --trace FILE"
    from pymoe.traces import load_trace

    t = load_trace(trace)
    if (t.n_expert, t.k) != (n_expert, k):
        return False, (
            f"trace {trace.name} routes top-{t.k} of {t.n_expert} experts, the model top-{k} of {n_expert}; "
            "hint: run e (the model's own router) instead of c: --configs without c"
        )
    return True, None


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = setup_arg_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind: kill the run, remove its cgroup, detach the loop device
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    sys.path.insert(0, str(TOOLS))
    import make_synthetic_moe as synth

    import pymoe
    from pymoe.offload import kv_cache_bytes

    try:
        size, n_expert, k = model_shape(args, synth, pymoe)
        fits, why_not = trace_fit(args.trace, n_expert, k)
        large = plan_defaults(args, size, fits)
        parse_limit(args.limit, size)
        parse_size(args.reserve)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = args.model or args.workdir / synth.default_output(args.preset, synth.resolve(args.preset)).name
    problem = check_plan(args, fits, why_not)
    if not problem and not model.is_file():
        args.workdir.mkdir(parents=True, exist_ok=True)
        problem = disk_room_problem(args.workdir, size, f"the {args.preset} model")
        if not problem and device_read_ahead(args.workdir) is None:
            problem = (
                f"{args.workdir} is on no block device (a tmpfs?): the runs would not read from a disk; "
                "hint: pass --workdir DIR on a disk"
            )
    problem = problem or check_environment(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    if large:
        print(f"a model of {format_bytes(size)}: the plan of models of {format_bytes(LARGE_MODEL)} and more")

    generated = None
    try:
        if not args.model:
            if not model.is_file():
                print(f"writing {model} ({format_bytes(size)}) ...", flush=True)
                generated = model
                t0 = time.perf_counter()
                synth.write_model(args.preset, model, progress=True)
                evict(model)  # written back now, not during the bandwidth measurement
                print(f"written in {time.perf_counter() - t0:.0f} s", flush=True)
            elif not args.keep:
                generated = model
            if "r" in args.configs.split(","):
                pad_to_sectors(model)  # our file: a loop device maps whole sectors
        return run(args, model, pymoe, kv_cache_bytes, started)
    except KeyboardInterrupt:  # the run, its cgroup and the loop device are gone by now
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if generated is not None and not args.keep:
            generated.unlink(missing_ok=True)
            print(f"deleted {generated} (--keep keeps it)", file=sys.stderr)


def run(args: argparse.Namespace, model: Path, pymoe: Any, kv_cache_bytes: Any, started: float) -> int:
    summary = pymoe.summarize(model)
    size = model.stat().st_size
    limit = parse_limit(args.limit, size)
    reserve = parse_size(args.reserve)
    kv = kv_cache_bytes(summary, max(args.pp, args.tg + 1))
    budget = max(0, limit - summary.other_bytes - kv - reserve)
    print(
        f"model {model} ({size / MiB:.0f} MiB: experts {summary.expert_bytes / MiB:.0f} MiB, "
        f"other {summary.other_bytes / MiB:.0f} MiB, {summary.bytes_per_expert / MiB:.2f} MiB per expert); "
        f"limit {limit / MiB:.0f} MiB (--limit {args.limit}: model = {size / limit:.2f}x the limit); pymoe budget = "
        f"limit - other - KV {kv / MiB:.1f} MiB - reserve {reserve / MiB:.0f} MiB = {budget / MiB:.0f} MiB"
    )
    if size < 2 * limit:
        print("warning: the model is less than twice the limit", file=sys.stderr)
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    bench = Bench(args, model, started)
    bench.read_ahead = device_read_ahead(model)
    ra = (
        f"{bench.read_ahead[1]} KiB (/sys/block/{bench.read_ahead[0]}/queue/read_ahead_kb)" if bench.read_ahead else "?"
    )
    print(f"read-ahead of the disk that holds the model: {ra}")
    print("disk bandwidth (O_DIRECT on the model file) ...", flush=True)
    bw = disk_bandwidth(model)
    for key, v in bw.items():
        print(f"  {key}: {v / 1e9:.2f} GB/s")
    bench.bw = max(bw.values())
    token_bytes = summary.n_layer * summary.n_expert_used * summary.bytes_per_expert
    print(
        f"roofline with no expert in memory: {bench.bw / 1e9:.2f} GB/s / {token_bytes / 1e9:.2f} GB per token "
        f"({summary.n_layer} layers x top-{summary.n_expert_used} x {summary.bytes_per_expert / MiB:.1f} MiB) = "
        f"{bench.bw / token_bytes:.2f} tok/s"
    )
    print("roofline below = disk bandwidth measured just before the run / disk bytes read per token\n")
    bench.head = {
        "model": str(model),
        "model_bytes": size,
        "summary": {k: v for k, v in summary.as_dict().items() if k != "path"},
        "limit": limit,
        "limit_arg": args.limit,
        "reserve": reserve,
        "kv_bytes": kv,
        "budget": budget,
        "disk_bandwidth": bw,
        "roofline_bandwidth": bench.bw,
        "roofline_no_cache": bench.bw / token_bytes,
        "read_ahead": {"device": bench.read_ahead[0], "read_ahead_kb": bench.read_ahead[1]}
        if bench.read_ahead
        else None,
        "threads": args.threads,
        "repack": args.repack,
        "trace": str(args.trace) if args.trace else None,
        "cpu": _cpu_name(),
        "argv": sys.argv[1:],
    }
    plan = plan_runs(args)
    n_sweep = len(args.sweep_policies.split(",")) * len(args.sweep_budgets.split(",")) if args.sweep else 0
    bench.n_runs = len(plan) + n_sweep + (len(ABLATION) if args.ablation else 0)
    with contextlib.ExitStack() as stack:
        if any(p.config == "r" for p in plan):
            bench.loop_problem = loop_problem(model) or ""
            if not bench.loop_problem:
                try:
                    bench.loop = stack.enter_context(LoopDevice(model, args.loop_read_ahead))
                except RuntimeError as e:
                    bench.loop_problem = str(e)
            if bench.loop:
                print(
                    f"r: {bench.loop.device} over the model file, read-only, direct-io "
                    f"{'on' if bench.loop.direct_io else 'OFF (the file is read through its page cache)'}, "
                    f"read_ahead_kb {bench.loop.read_ahead_kb}"
                )
                bench.head["loop"] = {
                    "device": bench.loop.device,
                    "read_ahead_kb": bench.loop.read_ahead_kb,
                    "direct_io": bench.loop.direct_io,
                }
            else:
                print(f"warning: r is skipped: {bench.loop_problem}", file=sys.stderr)
        print(HEADER, flush=True)
        for p in plan:
            execute(bench, p, limit, budget)
        if args.sweep:
            print("\nsweep: decode under the limit, replayed trace", flush=True)
            print(HEADER, flush=True)
            for policy in args.sweep_policies.split(","):
                for b in args.sweep_budgets.split(","):
                    bb: int | str = b if b == "auto" else parse_size(b)
                    what = f"pymoe {policy} budget {b}"
                    bench.run(bench.pymoe, "s", what, "tg", limit, args.sweep_tokens, 1, budget=bb, policy=policy)
        if args.ablation:
            ablation(args, bench, model, limit, budget)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    bench.head["disk_bandwidth_end"] = disk_bandwidth(model)
    print(
        "disk bandwidth at the end: "
        + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in bench.head["disk_bandwidth_end"].items())
    )
    bench.save()
    if args.json:
        print(f"wrote {args.json}")
    print(f"{bench.clock()} done", file=sys.stderr)
    return 0


ABLATION = [
    # (label, policy, replay, engine switches); replayed rows show what the cache
    # and precision techniques do on a real access pattern; the predictor needs
    # the model's own router (a replayed choice cannot be predicted), so
    # prefetching is measured without replay, beside its own baseline
    ("lru", "lru", True, {}),
    ("lru, no CPU assist", "lru", True, {"cpu_assist": False}),
    ("multidim", "multidim", True, {}),
    ("lru + low precision", "lru", True, {"sidecar": "LO"}),
    ("multidim + low precision", "multidim", True, {"sidecar": "LO"}),
    ("lru, own router", "lru", False, {}),
    ("lru + prefetch, own router", "lru", False, {"prefetch": True}),
    ("multidim + low precision + prefetch, own router", "multidim", False, {"sidecar": "LO", "prefetch": True}),
]


def ablation(args: argparse.Namespace, bench: Bench, model: Path, limit: int, budget: int) -> None:
    sidecar = model.with_name(model.stem + f".{args.lo_type}.lo.gguf")
    if not sidecar.is_file():
        print(f"\nablation: writing the {args.lo_type} sidecar {sidecar.name} ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pymoe",
                "convert",
                str(model),
                "--lo-type",
                args.lo_type,
                "--sidecar",
                str(sidecar),
            ],
            check=True,
            cwd=TOOLS,  # not the checkout root: `-m pymoe` would find the source tree first
        )
    bench.head["ablation_sidecar"] = {"path": str(sidecar), "bytes": sidecar.stat().st_size, "type": args.lo_type}
    print("\nablation: decode under the limit, budget as (c)", flush=True)
    print(HEADER, flush=True)
    try:
        for label, policy, replay, switches in ABLATION:
            engine = {k: (str(sidecar) if v == "LO" else v) for k, v in switches.items()}
            bench.run(
                bench.pymoe,
                "x",
                f"ablation: {label}",
                "tg",
                limit,
                args.sweep_tokens,
                1,
                budget=budget,
                policy=policy,
                replay=replay,
                engine=engine,
            )
    finally:
        if not args.keep:
            sidecar.unlink(missing_ok=True)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    return "?"


if __name__ == "__main__":
    sys.exit(main())
