#!/usr/bin/env python3
"""CPU-only benchmark of the expert-offload engine under a memory limit.

On one synthetic model (tools/make_synthetic_moe.py) at least twice the size
of a cgroup memory limit (page cache counted), measures prefill (a 512-token
prompt, like llama-bench's pp512) and decode (128 tokens from an empty cache,
like tg128) tokens/s of:

  (a) llama-bench (mmap), unconstrained: the ceiling;
  (b) llama-bench (mmap) under the limit;
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
llama-bench for a and b (tools/build_llama_tools.sh) and the Mixtral-8x7B decode
trace for c, --sweep and --ablation (--trace).

    python tools/bench_offload.py --trace T.jsonl      # mixtral-mini, 576 MiB, (a)-(e)
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

from pymoe._units import MiB
from pymoe.bench import find_llama_bench, read_bytes, timed_run

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(__file__).resolve().parent
TRACE_NAME = "mixtral8x7b-instruct-fp8_humaneval-p0-1_decode.jsonl"  # the Mixtral-8x7B decode trace


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


def run_in_cgroup(argv: list[str], cg: MemCgroup, timeout: float, mark_prefix: str | None = None) -> Finished:
    """Runs `argv` inside `cg` (the process joins the cgroup before exec, so
    before it opens anything) and waits for it with a timeout. Stderr lines
    starting with `mark_prefix` are time-stamped with the process's read_bytes."""
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
    err, marks = [], []
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
    import pymoe
    from pymoe.traces import load_trace

    kw: dict[str, Any] = {"n_ctx": spec["n_ctx"], "n_threads": spec["threads"], "n_batch": 512, "n_ubatch": 512}
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
    run = timed_run(m, n_prompt=n if pp else 0, n_gen=0 if pp else n, reps=spec["reps"])
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
    def __init__(self, args: argparse.Namespace, model: Path) -> None:
        self.args = args
        self.model = model
        self.deadline = time.monotonic() + args.max_minutes * 60
        self.results: list[RunResult] = []
        self.bw = 0.0  # the bandwidth of the roofline column
        self.head: dict[str, Any] = {}  # the JSON report's fields besides the results

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

    def llama_bench(self, config: str, mode: str, limit: int | None, tokens: int, reps: int) -> RunResult:
        a = self.args
        argv = [str(a.llama_bench), "-m", str(self.model), "-t", str(a.threads), "-fa", "off", "-lm", "mmap"]
        argv += ["--repack", "0", "-r", str(reps), "-o", "json", "--progress"]
        argv += ["-p", str(tokens), "-n", "0"] if mode == "pp" else ["-p", "0", "-n", str(tokens)]
        what = "llama-bench (mmap)" + (" under the limit" if limit else ", unconstrained")
        res = RunResult(config, what, mode, limit, tokens, " ".join(argv[0:1] + argv[1:]).replace(str(ROOT) + "/", ""))
        if self.out_of_time():
            res.error = "skipped: out of time"
            return res
        self.prepare(res)
        with MemCgroup(limit) as cg:
            fin = run_in_cgroup(argv, cg, self.timeout(a.run_timeout), mark_prefix="llama-bench: benchmark")
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
        }
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        command = "pymoe.Model(" + ", ".join(
            [f"offload={'on' if offload else 'off'}"]
            + ([f"expert_budget={budget}", f"policy={policy}", "offload_tier=disk"] if offload else [])
            + (["replay=<mixtral decode trace>"] if spec["replay"] else [])
            + [f"{k}={Path(v).name if k == 'sidecar' else v}" for k, v in (engine or {}).items()]
            + [f"n_threads={a.threads}"]
        )
        command += f") {mode}{tokens} x{reps}"
        res = RunResult(config, what, mode, limit, tokens, command, policy=policy if offload else None)
        if self.out_of_time():
            res.error = "skipped: out of time"
            return res
        self.prepare(res)
        with MemCgroup(limit) as cg:
            fin = run_in_cgroup(argv, cg, self.timeout(a.run_timeout))
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
    f"{'cfg':<4} {'run':<46} {'mode':<6} {'tok/s':>8} {'hit':>5} {'MiB/tok':>8} {'eng MiB/tok':>11} "
    f"{'roofline':>8} {'peak MiB':>8} {'others':>6}"
)


def format_row(r: RunResult, bw: float) -> str:
    bw = r.extra.get("disk_bandwidth_before") or bw
    if r.error:
        return f"{r.config:<4} {r.what[:46]:<46} {r.mode + str(r.tokens):<6} {r.error[:120]}"
    roof = bw / r.read_bytes_per_token if r.read_bytes_per_token and r.read_bytes_per_token > MiB / 8 else None
    return (
        f"{r.config:<4} {r.what[:46]:<46} {r.mode + str(r.tokens):<6} {_fmt(r.tokens_per_second, '.2f'):>8} "
        f"{_fmt(r.hit_rate, '.2f'):>5} {_fmt((r.read_bytes_per_token or 0) / MiB, '.1f'):>8} "
        f"{_fmt(r.engine_bytes_per_token / MiB if r.engine_bytes_per_token is not None else None, '.1f'):>11} "
        f"{_fmt(roof, '.1f', 'inf'):>8} {_fmt((r.peak_memory or 0) / MiB, '.0f'):>8} "
        f"{_fmt(r.extra.get('others_cpu'), '.0%'):>6}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The tables of a --json report, as Markdown (docs/benchmarks.md)."""
    bw = report["roofline_bandwidth"]
    lines = [
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


def setup_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="mixtral-mini", help="synthetic model preset (tools/make_synthetic_moe.py)")
    ap.add_argument("--model", type=Path, help="use this GGUF instead of generating one (kept)")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / "build" / "bench",
        help="where the model is generated (default: build/bench in this checkout; not a tmpfs: the runs read it "
        "from the disk)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated model")
    ap.add_argument("--limit", default="576MiB", help="cgroup memory limit (page cache counted)")
    ap.add_argument("--reserve", default="128MiB", help="pymoe budget = limit - non-expert weights - KV - reserve")
    ap.add_argument(
        "--trace",
        type=Path,
        help=f"the routing trace to replay, for c, --sweep and --ablation: the Mixtral-8x7B decode trace {TRACE_NAME}",
    )
    ap.add_argument(
        "--llama-bench",
        metavar="PATH",
        help="llama-bench for a and b (default: as `pymoe bench --vs-llama-cpp` finds it: $PYMOE_LLAMA_BENCH, "
        "build/llama-tools/bin/ of the checkout you run from, PATH)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512, help="prompt tokens (prefill)")
    ap.add_argument("--tg", type=int, default=128, help="generated tokens (decode)")
    ap.add_argument("--tg-limited", type=int, default=16, help="decode tokens of llama-bench under the limit")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of unconstrained runs")
    ap.add_argument("--configs", default="a,b,c,d,e", help="which of a,b,c,d,e to run")
    ap.add_argument("--modes", default="pp,tg")
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
    ap.add_argument("--run-timeout", type=float, default=240.0, help="seconds per run")
    ap.add_argument("--max-minutes", type=float, default=20.0, help="runs left when this is spent are skipped")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="wait up to this long for a quiet CPU per run")
    ap.add_argument(
        "--max-others",
        type=float,
        default=10.0,
        help="retry a run when other processes used more than this %% of the CPUs",
    )
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a run disturbed by other jobs")
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
    if any(c in args.configs.split(",") for c in "ab"):
        try:
            args.llama_bench = find_llama_bench(args.llama_bench)
        except FileNotFoundError as e:
            return str(e)
    if needs_trace(args):
        if args.trace is None:
            return f"configuration c, --sweep and --ablation replay a routing trace; hint: pass --trace {TRACE_NAME}"
        if not args.trace.is_file():
            return f"trace {args.trace} is missing; hint: pass --trace FILE"
    return None


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: kill the run, remove its cgroup
    problem = check_environment(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(TOOLS))
    import make_synthetic_moe as synth

    import pymoe
    from pymoe.offload import kv_cache_bytes

    generated = None
    if args.model:
        model = args.model
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        p = synth.resolve(args.preset)
        model = args.workdir / synth.default_output(args.preset, p).name
        if not model.is_file():
            print(f"writing {model} ...", flush=True)
            synth.write_model(args.preset, model)
            generated = model
        elif not args.keep:
            generated = model
    try:
        return run(args, model, pymoe, kv_cache_bytes)
    finally:
        if generated is not None and not args.keep:
            generated.unlink(missing_ok=True)


def run(args: argparse.Namespace, model: Path, pymoe: Any, kv_cache_bytes: Any) -> int:
    summary = pymoe.summarize(model)
    limit = parse_size(args.limit)
    reserve = parse_size(args.reserve)
    size = model.stat().st_size
    kv = kv_cache_bytes(summary, max(args.pp, args.tg + 1))
    budget = max(0, limit - summary.other_bytes - kv - reserve)
    print(
        f"model {model} ({size / MiB:.0f} MiB: experts {summary.expert_bytes / MiB:.0f} MiB, "
        f"other {summary.other_bytes / MiB:.0f} MiB, {summary.bytes_per_expert / MiB:.2f} MiB per expert); "
        f"limit {limit / MiB:.0f} MiB (model = {size / limit:.2f}x the limit); pymoe budget = limit - other "
        f"- KV {kv / MiB:.1f} MiB - reserve {reserve / MiB:.0f} MiB = {budget / MiB:.0f} MiB"
    )
    if size < 2 * limit:
        print("warning: the model is less than twice the limit", file=sys.stderr)
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("disk bandwidth (O_DIRECT on the model file) ...", flush=True)
    bw = disk_bandwidth(model)
    for k, v in bw.items():
        print(f"  {k}: {v / 1e9:.2f} GB/s")
    bench = Bench(args, model)
    bench.bw = max(bw.values())
    print("roofline below = disk bandwidth measured just before the run / disk bytes read per token\n")
    bench.head = {
        "model": str(model),
        "model_bytes": size,
        "summary": {k: v for k, v in summary.as_dict().items() if k != "path"},
        "limit": limit,
        "reserve": reserve,
        "kv_bytes": kv,
        "budget": budget,
        "disk_bandwidth": bw,
        "roofline_bandwidth": bench.bw,
        "threads": args.threads,
        "trace": str(args.trace) if args.trace else None,
        "cpu": _cpu_name(),
        "argv": sys.argv[1:],
    }
    print(HEADER, flush=True)
    configs, modes = set(args.configs.split(",")), args.modes.split(",")
    lb, pm = bench.llama_bench, bench.pymoe
    for mode in modes:
        n = args.pp if mode == "pp" else args.tg
        if "a" in configs:
            bench.run(lb, "a", mode, None, n, args.reps)
        if "b" in configs:
            bench.run(lb, "b", mode, limit, n if mode == "pp" else args.tg_limited, 1)
        if "c" in configs:
            bench.run(pm, "c", "pymoe disk tier, replayed trace, under the limit", mode, limit, n, 1, budget=budget)
        if "d" in configs:
            bench.run(pm, "d", "pymoe offload off, unconstrained", mode, None, n, args.reps, offload=False)
        if "e" in configs:
            what = "pymoe disk tier, own router, under the limit"
            bench.run(pm, "e", what, mode, limit, n, 1, budget=budget, replay=False)
    if args.sweep:
        print("\nsweep: decode under the limit, replayed trace", flush=True)
        print(HEADER, flush=True)
        for policy in args.sweep_policies.split(","):
            for b in args.sweep_budgets.split(","):
                bb: int | str = b if b == "auto" else parse_size(b)
                what = f"pymoe {policy} budget {b}"
                bench.run(pm, "s", what, "tg", limit, args.sweep_tokens, 1, budget=bb, policy=policy)
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
