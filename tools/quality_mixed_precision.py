"""What token-level mixed precision (HOBBIT) costs in quality, measured.

A (token, expert) pair whose gate weight is below `lo_threshold` is computed
from the expert's low-precision copy (the sidecar); every other pair at high
precision. This script sweeps the threshold for several low types and reports,
against the high-only run of the same model:

- the share of pairs computed in low precision (the engine's
  `lo_share_of_pairs`),
- perplexity (llama-perplexity's method: chunks of --n-ctx tokens, each from an
  empty cache, the second half scored) and its change,
- top-1 agreement (argmax of the logits at the scored positions),
- mean KL(high || mixed) over the scored positions.

The measuring is pymoe's own (`Model.perplexity`, what `pymoe perplexity
--kl-divergence-base/--kl-divergence` runs): each reference run saves its
log-probabilities to a file, and every other run is compared with that file.
This script builds the models, runs the sweep and checks the results.

Real text, real model: SmolLM2-135M-Instruct (Q4_1, the demo's dense model)
upcycled to 8 experts, top-2, with an *ungrouped* random router, so that the
top-2 gate weights vary per token (the demo model's grouped router makes them
exactly 0.5). Every expert is the dense FFN, so this measures the precision
loss of the expert weights, not the routing quality of a trained MoE. Text:
/usr/share/common-licenses/GPL-3 followed by Apache-2.0 (~46 KB of English).

Random-weight models: tiny random checkpoints from tests/hf_models.py
(transformers), converted with f32 experts and a sidecar per low type; mean
KL(high || mixed) on sequences of random token ids (each one chunk, its
second half scored, as on text), and the share of pairs below each
threshold as transformers' own router computes it (an independent check of
the engine's share).

How a run is set up so that the threshold alone decides the precision:

- tokens are decoded one per step (`token_by_token`): the planner decides
  per distinct expert of a step with the largest gate weight in that step, so
  in a batch (prefill) an expert is important when any of its tokens is;
  decoding one token per step makes every pair's decision its own;
- `offload_tier="host"`, `expert_budget=1.0`, `lo_share=1.0`,
  `cpu_assist=False`: the whole budget is low-precision slots, so an important
  pair is computed where the high-precision weights are (the direct branch,
  bit-identical to a high slot) and an unimportant one from a low slot. A
  budget with high slots would let a cached high copy serve unimportant pairs
  too (a high hit is always taken), so the low share would depend on the
  cache's history and not only on the threshold; the budget cannot hold both
  copies of every expert because the engine caps it at the model's expert
  bytes.

Checks made on every run (`run_checks`): the high-only reference (threshold
0, sidecar loaded) uses no low pair and equals offload="off" bit for bit;
threshold 0.5 on a top-2 model puts exactly half of the pairs in low precision
(the smaller of two weights relative to their sum is below 0.5), 1.01 all of them, and
the share does not fall as the threshold rises; on the random models the
engine's share is within 0.03 of the share transformers' router gives.

    python tools/quality_mixed_precision.py --json build/quality.json
    python tools/quality_mixed_precision.py --chunks 2 --lo-types q4_0,q2_K   # quicker

Built files are cached in ~/.cache/pymoe/quality (PYMOE_CACHE_DIR moves it),
each written atomically. --jobs worker processes (default 2) with --threads
llama.cpp threads each (default 1: on a busy 2-core machine one process with
two threads decoded 20x slower than one with one, its threads waiting for
each other). Exit status 1 when a check fails (they are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")
LO_TYPES = ("q8_0", "q4_0", "iq4_nl", "q3_K", "q2_K")
THRESHOLDS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.45, 0.5, 1.01)
RANDOM_ARCHS = ("mixtral", "mixtral:wide", "qwen3_moe", "qwen3_moe:wide", "olmoe")
RANDOM_LO_TYPES = ("q4_0", "q2_K")
UPCYCLE_SEED = 0
N_EXPERT, N_EXPERT_USED = 8, 2
RECIPE = 1  # bump when the way the cached files are built changes
PROJECTIONS = ("gate", "up", "down", "gate_up")


# --------------------------------------------------------------------------- building (cached, atomic)


def cache_root(arg: str | None) -> Path:
    from pymoe import _fetch

    root = Path(arg).expanduser() if arg else _fetch.cache_dir() / "quality"
    root.mkdir(parents=True, exist_ok=True)
    return root


def upcycled_model(cache: Path) -> Path:
    """SmolLM2-135M-Instruct upcycled to 8 experts, top-2, ungrouped router."""
    from pymoe.demo import dense_model_path
    from pymoe.upcycle import upcycle

    out = cache / f"SmolLM2-135M-Instruct-{N_EXPERT}x-top{N_EXPERT_USED}-ungrouped-s{UPCYCLE_SEED}-r{RECIPE}.Q4_1.gguf"
    if not out.is_file():
        upcycle(
            dense_model_path(),
            out,
            n_expert=N_EXPERT,
            n_expert_used=N_EXPERT_USED,
            seed=UPCYCLE_SEED,
            grouped=False,
            force=True,
        )
    return out


def sidecar_path(main: Path, lo_type: str) -> Path:
    return main.with_name(f"{main.name.removesuffix('.gguf')}.{lo_type}.lo.gguf")


def ensure_sidecar(main: Path, lo_type: str) -> Path:
    """The sidecar of `main` in `lo_type`, rebuilt when missing or bound to another main file."""
    from pymoe.convert import build_sidecar
    from pymoe.sidecar import check_sidecar

    path = sidecar_path(main, lo_type)
    if path.is_file():
        try:
            check_sidecar(main, path)
            return path
        except ValueError:
            pass
    build_sidecar(main, path, lo_type=lo_type, force=True)
    return path


def effective_types(sidecar: Path) -> dict[str, str]:
    """Projection -> the types its tensors have in the sidecar (per-tensor fallbacks included),
    read from the file's own tensor table."""
    from pymoe import _core

    found: dict[str, set[str]] = {}
    for t in _core.read_gguf(str(sidecar), 0)["tensors"]:
        proj = t["name"].split(".")[2].removeprefix("ffn_").removesuffix("_exps")
        found.setdefault(proj, set()).add(t["type"])
    return {p: "/".join(sorted(found[p])) for p in PROJECTIONS if p in found}


def bits_per_weight(path: Path) -> float:
    """Bits per expert weight of the routed-expert tensors in a GGUF."""
    from pymoe import _core
    from pymoe.sidecar import is_expert_weight

    nbytes = n = 0
    for t in _core.read_gguf(str(path), 0)["tensors"]:
        if is_expert_weight(t["name"]):
            nbytes += int(t["nbytes"])
            n += int(np.prod(t["shape"]))
    return 8.0 * nbytes / n if n else 0.0


def _hf_models() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    import hf_models  # tests/hf_models.py; needs transformers

    return hf_models


def random_checkpoint(cache: Path, arch: str, wide: bool) -> Path:
    """A tiny random checkpoint (tests/hf_models.py), built in a temporary folder and renamed into place."""
    out = cache / f"random-{arch}{'-wide' if wide else ''}-r{RECIPE}"
    if (out / "config.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=cache))
    try:
        _hf_models().build_checkpoint(arch, tmp, wide=wide)
        try:
            os.rename(tmp, out)
        except OSError:  # another run put it there first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def random_model(cache: Path, ckpt: Path, lo_type: str) -> tuple[Path, Path]:
    """f32 GGUF of `ckpt` (experts f32) and its `lo_type` sidecar, from one `convert` call."""
    from pymoe.convert import convert
    from pymoe.sidecar import check_sidecar

    main = cache / f"{ckpt.name}.{lo_type}.f32.gguf"
    side = sidecar_path(main, lo_type)
    if main.is_file() and side.is_file():
        try:
            check_sidecar(main, side)
            return main, side
        except ValueError:
            pass
    convert(str(ckpt), main, outtype="f32", expert_type="f32", lo_type=lo_type, sidecar=side, force=True)
    return main, side


# --------------------------------------------------------------------------- text


def load_text(paths: list[str]) -> str:
    parts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"text file '{path}' does not exist; hint: pass --text with English text files")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- one configuration (a worker task)


@dataclass
class Task:
    """One `Model.perplexity` run: save a reference (`save`) or compare with one (`reference`)."""

    name: str
    model: str
    kwargs: dict[str, Any]  # Model(...) settings
    tokens: list[int] | None  # the text; None with a reference (its own tokens and chunks)
    n_ctx: int
    chunks: int = 0  # spread over the text, 0 = all
    token_by_token: bool = True
    reference: str | None = None
    save: str | None = None


STAT_KEEP = ("lo_share_of_pairs", "pairs", "lo_pairs", "direct", "direct_pairs", "pool_pairs", "loads", "loads_lo")


def run_task(task: Task) -> dict[str, Any]:
    from pymoe import Model

    t0 = time.monotonic()
    with Model(task.model, **task.kwargs) as m:
        res = m.perplexity(
            task.tokens,
            n_ctx=None if task.reference else task.n_ctx,
            chunks=task.chunks,
            token_by_token=task.token_by_token,
            reference=task.reference,
            save_reference=task.save,
        )
        stats = m.offload_stats()
    out: dict[str, Any] = {"name": task.name, "seconds": time.monotonic() - t0, "result": res.as_dict()}
    if stats is not None:
        out["stats"] = {k: stats[k] for k in (*STAT_KEEP, "hits", "hits_lo", "n_slots", "n_slots_lo")}
    return out


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: perplexity, the low share, and against its reference the paired
    perplexity change, agreement, KL and whether the logits were bit-identical."""
    r = res["result"]
    s: dict[str, Any] = {"name": res["name"], "seconds": round(res["seconds"], 1), "n_scored": r["n_tokens"]}
    s["perplexity"] = r["perplexity"]
    if "stats" in res:
        s["lo_share_of_pairs"] = res["stats"]["lo_share_of_pairs"]
        s["offload"] = res["stats"]
    c = r["comparison"]
    if c is not None:
        s["ppl_change_pct"] = 100.0 * (c["ppl_ratio"] - 1.0)
        s["ppl_change_pct_stderr"] = 100.0 * c["ppl_ratio_stderr"]
        s["top1_agreement"] = c["top1_agreement"]
        s["kl_mean"] = c["kl_mean"]
        s["kl_p99"] = c["kl_p99"]
        s["identical"] = c["identical"]
        s["exact"] = c["identical"] == 1.0
    return s


def engine_kwargs(sidecar: Path | None, threshold: float, n_ctx: int, threads: int) -> dict[str, Any]:
    """Every important pair at high precision where the weights are, every unimportant one from a low slot."""
    kw: dict[str, Any] = {"n_ctx": n_ctx, "n_threads": threads}
    if sidecar is None:
        return {**kw, "offload": "off"}
    return {
        **kw,
        "offload": "on",
        "offload_tier": "host",
        "expert_budget": 1.0,
        "lo_share": 1.0,
        "lo_threshold": threshold,
        "cpu_assist": False,
        "sidecar": str(sidecar),
    }


# --------------------------------------------------------------------------- the two studies


def run_pool(tasks: list[Task], jobs: int, log: Any) -> list[dict[str, Any]]:
    if jobs <= 1:
        out = []
        for t in tasks:
            out.append(run_task(t))
            log(f"  {t.name}: {out[-1]['seconds']:.1f}s")
        return out
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_task, t) for t in tasks]
        results = []
        for t, f in zip(tasks, futures, strict=True):
            results.append(f.result())
            log(f"  {t.name}: {results[-1]['seconds']:.1f}s")
        return results


def study_upcycled(args: argparse.Namespace, cache: Path, work: Path, log: Any) -> dict[str, Any]:
    from pymoe import Model
    from pymoe.perplexity import pick_chunks

    t0 = time.monotonic()
    main = upcycled_model(cache)
    sidecars = {lt: ensure_sidecar(main, lt) for lt in args.lo_types}
    log(f"model and sidecars ready in {time.monotonic() - t0:.1f}s: {main}")
    types = {
        lt: {"effective": effective_types(p), "bits_per_weight": bits_per_weight(p), "bytes": p.stat().st_size}
        for lt, p in sidecars.items()
    }
    text = load_text(args.text)
    with Model(main, n_ctx=args.n_ctx, offload="off") as m:
        tokens = m.tokenize(text, add_bos=False)
    n, picked = args.n_ctx, pick_chunks(len(tokens) // args.n_ctx, args.chunks)
    log(
        f"text: {len(text)} characters, {len(tokens)} tokens; {len(picked)} chunks of {n} "
        f"(chunk indices {picked} of {len(tokens) // n}), {len(picked) * (n - n // 2)} scored positions"
    )
    ref_file, batched_file = str(work / "ref.kld"), str(work / "ref-batched.kld")

    def task(name: str, kwargs: dict[str, Any], **kw: Any) -> Task:
        return Task(name, str(main), kwargs, None, n, reference=ref_file, **kw)

    # the references: threshold 0 with a sidecar loaded, token by token and in one batch per chunk
    # (llama-perplexity's own way)
    high = engine_kwargs(sidecars[args.lo_types[0]], 0.0, n, args.threads)
    ref_tasks = [
        Task("high-only", str(main), high, tokens, n, args.chunks, save=ref_file),
        Task("high-only batched", str(main), high, tokens, n, args.chunks, token_by_token=False, save=batched_file),
    ]
    log("high-only references (threshold 0):")
    ref_res, batched_ref = run_pool(ref_tasks, args.jobs, log)
    # the evaluation's own floor: the same high-only model, one batch per chunk against token by token
    floor = "high-only batched vs token by token"
    tasks = [task(floor, high, token_by_token=False), task("offload=off", engine_kwargs(None, 0.0, n, args.threads))]
    for lt in args.lo_types:
        for thr in args.thresholds:
            tasks.append(task(f"{lt}@{thr:g}", engine_kwargs(sidecars[lt], thr, n, args.threads)))
    extra_type = "q2_K" if "q2_K" in sidecars else args.lo_types[-1]
    extra = engine_kwargs(sidecars[extra_type], 0.5, n, args.threads)
    # a partial budget (a cached high copy also serves unimportant pairs) and a batch per chunk
    # (prefill: an expert's importance is its largest weight over the batch), against the
    # token-by-token and the batched reference respectively
    partial = f"{extra_type}@0.5 budget 50%, lo_share 0.25"
    tasks.append(task(partial, {**extra, "expert_budget": 0.5, "lo_share": 0.25}))
    batched = f"{extra_type}@0.5 batched"
    tasks.append(Task(batched, str(main), extra, None, n, token_by_token=False, reference=batched_file))
    log(f"{len(tasks)} runs:")
    summary = {r["name"]: summarize(r) for r in run_pool(tasks, args.jobs, log)}
    sweep = {lt: [{"threshold": thr, **summary[f"{lt}@{thr:g}"]} for thr in args.thresholds] for lt in args.lo_types}
    return {
        "model": str(main),
        "model_bits_per_weight": bits_per_weight(main),
        "text": args.text,
        "n_tokens_text": len(tokens),
        "n_ctx": n,
        "chunks": picked,
        "n_scored": ref_res["result"]["n_tokens"],
        "sidecars": types,
        "reference": summarize(ref_res),
        "reference_batched": summarize(batched_ref),
        "batched_vs_sequential": summary[floor],
        "offload_off_check": summary["offload=off"],
        "sweep": sweep,
        "partial_budget": summary[partial],
        "batched": summary[batched],
        "seconds": time.monotonic() - t0,
    }


def expected_shares(ckpt: Path, seqs: list[np.ndarray], thresholds: list[float]) -> dict[float, float]:
    """Share of pairs whose gate weight is below each threshold, from transformers' router logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    k = int(cfg.num_experts_per_tok)
    weights = []
    with torch.no_grad():
        for s in seqs:
            out = model(torch.tensor([s.tolist()], dtype=torch.long), output_router_logits=True)
            for logits in out.router_logits:
                p = torch.softmax(logits.float(), dim=-1)
                top = torch.topk(p, k, dim=-1).values
                # the engine weighs each pair relative to its token's top-k sum, normalised or not
                weights.append((top / top.sum(-1, keepdim=True)).numpy().ravel())
    w = np.concatenate(weights)
    return {t: float((w < t).mean()) for t in thresholds}


def study_random(
    args: argparse.Namespace, cache: Path, work: Path, log: Any, checkpoints: dict[str, Path] | None = None
) -> dict[str, Any]:
    """The random-weight models; `checkpoints` gives ready checkpoints by spec (else built in `cache`)."""
    import pymoe
    from pymoe import Model

    t0 = time.monotonic()
    out: dict[str, Any] = {"archs": {}, "n_seqs": args.random_seqs, "seq_len": args.random_len}
    ref_tasks, tasks, meta = [], [], {}
    n = args.random_len
    for spec in args.random_archs:
        arch, _, variant = spec.partition(":")
        ckpt = (checkpoints or {}).get(spec) or random_checkpoint(cache, arch, variant == "wide")
        models: dict[str, tuple[Path, Path]] = {}
        seen: dict[tuple[tuple[str, str], ...], str] = {}
        same_as = {}
        for lt in args.random_lo_types:
            main_lt, side_lt = random_model(cache, ckpt, lt)
            eff = tuple(sorted(effective_types(side_lt).items()))
            if eff in seen:  # every tensor fell back to a type measured already: same sidecar
                same_as[lt] = seen[eff]
                continue
            seen[eff] = lt
            models[lt] = (main_lt, side_lt)
        main0 = next(iter(models.values()))[0]
        with Model(main0, offload="off") as m:
            n_vocab = m.n_vocab
            bos = m.tokenize("", add_bos=True)
        rng = np.random.default_rng(1)
        seqs = [rng.integers(0, n_vocab, n).astype(np.int32) for _ in range(args.random_seqs)]
        for s in seqs:
            s[: len(bos)] = bos  # as perplexity feeds a chunk
        meta[spec] = {
            "checkpoint": str(ckpt),
            "k": pymoe.summarize(main0).n_expert_used,
            # token by token the engine sees each chunk but its last token
            "expected_share": expected_shares(ckpt, [s[:-1] for s in seqs], args.thresholds),
            "sidecars": {lt: {"effective": effective_types(s)} for lt, (_, s) in models.items()},
            "same_as": same_as,
        }
        tokens = np.concatenate(seqs).tolist()
        for lt, (main, side) in models.items():
            ref = str(work / f"{spec.replace(':', '-')}.{lt}.ref.kld")
            base = engine_kwargs(side, 0.0, n, args.threads)
            ref_tasks.append(Task(f"{spec} {lt} high-only", str(main), base, tokens, n, save=ref))
            off = engine_kwargs(None, 0.0, n, args.threads)
            tasks.append(Task(f"{spec} {lt} off", str(main), off, None, n, reference=ref))
            for thr in args.thresholds:
                kwt = engine_kwargs(side, thr, n, args.threads)
                tasks.append(Task(f"{spec} {lt}@{thr:g}", str(main), kwt, None, n, reference=ref))
    log(f"random models built in {time.monotonic() - t0:.1f}s; {len(ref_tasks) + len(tasks)} runs")
    refs = {r["name"]: summarize(r) for r in run_pool(ref_tasks, args.jobs, lambda _msg: None)}
    by_name = {r["name"]: summarize(r) for r in run_pool(tasks, args.jobs, lambda _msg: None)}
    for spec in args.random_archs:
        entry = dict(meta[spec])
        entry["types"] = {}
        for lt in meta[spec]["sidecars"]:
            entry["types"][lt] = {
                "reference": refs[f"{spec} {lt} high-only"],
                "offload_off_check": by_name[f"{spec} {lt} off"],
                "sweep": [{"threshold": thr, **by_name[f"{spec} {lt}@{thr:g}"]} for thr in args.thresholds],
            }
        out["archs"][spec] = entry
    out["seconds"] = time.monotonic() - t0
    return out


# --------------------------------------------------------------------------- recommendation and tables


def recommend(report: dict[str, Any], lo_type: str, max_ppl_pct: float, max_kl: float) -> dict[str, Any]:
    """The largest swept threshold at which, for `lo_type`, the perplexity increase plus one standard
    error stays within `max_ppl_pct` percent and the mean KL(high || mixed) within `max_kl` nats;
    also the same answer for every other measured low type."""

    def best(sweep: list[dict[str, Any]]) -> dict[str, Any] | None:
        ok = [
            r
            for r in sweep
            if r["ppl_change_pct"] + r["ppl_change_pct_stderr"] <= max_ppl_pct and r["kl_mean"] <= max_kl
        ]
        return max(ok, key=lambda r: r["threshold"]) if ok else None

    per_type = {}
    for lt, sweep in report["upcycled"]["sweep"].items():
        b = best(sweep)
        per_type[lt] = {
            "threshold": b["threshold"] if b else 0.0,
            "lo_share_of_pairs": b["lo_share_of_pairs"] if b else 0.0,
        }
    chosen = per_type.get(lo_type, {"threshold": None, "lo_share_of_pairs": None})
    return {"lo_type": lo_type, "max_ppl_change_pct": max_ppl_pct, "max_kl": max_kl, **chosen, "per_type": per_type}


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def print_report(report: dict[str, Any]) -> None:
    up = report.get("upcycled")
    if up:
        ref = up["reference"]
        off = up["offload_off_check"]
        print(f"\n## Upcycled SmolLM2-135M-Instruct (Q4_1 experts, {up['model_bits_per_weight']:.2f} bits/weight)")
        print(
            f"text: {', '.join(up['text'])}; {up['n_tokens_text']} tokens; chunks {up['chunks']} of {up['n_ctx']}; "
            f"{up['n_scored']} scored positions"
        )
        bvs = up["batched_vs_sequential"]
        print(
            f"high-only perplexity {ref['perplexity']:.4f} token by token, {up['reference_batched']['perplexity']:.4f} "
            f"in one batch per chunk; token by token equals offload=off bit for bit: {off['exact']} "
            f"(at {off['identical']:.0%} of the positions)"
        )
        print(
            f"high-only, batched against token by token: Δppl {bvs['ppl_change_pct']:+.2f}%, "
            f"top-1 {bvs['top1_agreement']:.4f}, KL {bvs['kl_mean']:.5f}\n"
        )
        print(
            fmt_table(
                ["low type", "gate", "up", "down", "bits/weight", "MB"],
                [
                    [
                        lt,
                        t["effective"].get("gate", "-"),
                        t["effective"].get("up", "-"),
                        t["effective"].get("down", "-"),
                        f"{t['bits_per_weight']:.2f}",
                        f"{t['bytes'] / 1e6:.0f}",
                    ]
                    for lt, t in up["sidecars"].items()
                ],
            )
        )
        for lt, sweep in up["sweep"].items():
            print(f"\n### low type {lt}\n")
            print(
                fmt_table(
                    ["threshold", "low share", "perplexity", "Δppl %", "± se", "top-1 agree", "KL mean", "KL p99"],
                    [
                        [
                            f"{r['threshold']:g}",
                            f"{r['lo_share_of_pairs']:.4f}",
                            f"{r['perplexity']:.4f}",
                            f"{r['ppl_change_pct']:+.2f}",
                            f"{r['ppl_change_pct_stderr']:.2f}",
                            f"{r['top1_agreement']:.4f}",
                            f"{r['kl_mean']:.5f}",
                            f"{r['kl_p99']:.4f}",
                        ]
                        for r in sweep
                    ],
                )
            )
        for key, what in (
            ("partial_budget", "token by token, against the token-by-token reference"),
            ("batched", "one batch per chunk, against the batched reference"),
        ):
            r = up[key]
            print(
                f"\n{r['name']} ({what}): low share {r['lo_share_of_pairs']:.4f}, Δppl {r['ppl_change_pct']:+.2f}%, "
                f"top-1 {r['top1_agreement']:.4f}, KL {r['kl_mean']:.5f}"
            )
    rnd = report.get("random")
    if rnd:
        print(f"\n## Random-weight models ({rnd['n_seqs']} x {rnd['seq_len']} random token ids)\n")
        rows = []
        for spec, entry in rnd["archs"].items():
            for lt, t in entry["types"].items():
                eff = "/".join(entry["sidecars"][lt]["effective"].get(p, "-") for p in ("gate", "up", "down"))
                for r in t["sweep"]:
                    rows.append(
                        [
                            spec,
                            lt,
                            eff,
                            f"{r['threshold']:g}",
                            f"{entry['expected_share'][r['threshold']]:.4f}",
                            f"{r['lo_share_of_pairs']:.4f}",
                            f"{r['kl_mean']:.3g}",
                            f"{r['top1_agreement']:.4f}",
                        ]
                    )
        print(
            fmt_table(
                ["model", "low type", "gate/up/down", "threshold", "share (HF)", "low share", "KL mean", "top-1 agree"],
                rows,
            )
        )
        exact = {
            f"{spec} {lt}": t["offload_off_check"]["exact"]
            for spec, e in rnd["archs"].items()
            for lt, t in e["types"].items()
        }
        print(f"\nthreshold 0 equals offload=off bit for bit: {exact}")
    rec = report.get("recommendation")
    if rec:
        print(
            f"\nlargest swept threshold with Δppl + se <= {rec['max_ppl_change_pct']}% and mean KL <= "
            f"{rec['max_kl']}: " + ", ".join(f"{lt} {v['threshold']:g}" for lt, v in rec["per_type"].items())
        )
        if rec["threshold"] is not None:
            print(
                f"recommended lo_threshold (for {rec['lo_type']}): {rec['threshold']:g}, "
                f"low share there {rec['lo_share_of_pairs']:.4f}"
            )


def run_checks(report: dict[str, Any], share_tolerance: float = 0.03) -> list[dict[str, Any]]:
    """What must hold for the numbers to mean what they say: the reference is exact and uses no low
    pair, and the low share is what the threshold gives (exactly 1/2 at 0.5 on a top-2 model, since
    weights relative to the top-2 sum add up to 1, 1 above 1, non-decreasing; on the random models,
    transformers' router's share)."""
    out: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        out.append({"check": name, "ok": bool(ok), "detail": detail})

    def check_reference(label: str, off: dict[str, Any], ref: dict[str, Any]) -> None:
        check(f"{label}: threshold 0 equals offload=off", off["exact"], f"bit-identical at {off['identical']:.2%}")
        check(f"{label}: threshold 0 uses no low pair", ref["lo_pairs"] == 0, f"lo_pairs {ref['lo_pairs']}")

    def check_shares(label: str, sweep: list[dict[str, Any]], k: int) -> None:
        shares = [(r["threshold"], r["lo_share_of_pairs"]) for r in sweep]
        if k == 2:
            want = {0.5: 0.5} | {t: 1.0 for t, _ in shares if t > 1.0}
            bad = [(t, v) for t, v in shares if t in want and v != want[t]]
            check(f"{label}: share 1/2 at 0.5, 1 above 1", not bad, f"(threshold, share) {shares}")
        values = [v for _, v in shares]
        check(f"{label}: share non-decreasing", values == sorted(values), f"{values}")

    up = report.get("upcycled")
    if up:
        check_reference("upcycled", up["offload_off_check"], up["reference"]["offload"])
        for lt, sweep in up["sweep"].items():
            check_shares(f"upcycled {lt}", sweep, N_EXPERT_USED)
    rnd = report.get("random")
    if rnd:
        for spec, entry in rnd["archs"].items():
            for lt, t in entry["types"].items():
                check_reference(f"{spec} {lt}", t["offload_off_check"], t["reference"]["offload"])
                check_shares(f"{spec} {lt}", t["sweep"], entry["k"])
                diffs = [abs(r["lo_share_of_pairs"] - entry["expected_share"][r["threshold"]]) for r in t["sweep"]]
                check(
                    f"{spec} {lt}: share within {share_tolerance} of transformers' router",
                    max(diffs) <= share_tolerance,
                    f"largest difference {max(diffs):.4f}",
                )
    return out


def parse_list(text: str, cast: Any = str) -> list[Any]:
    return [cast(x) for x in text.split(",") if x.strip()]


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", help="where built models go (default ~/.cache/pymoe/quality)")
    p.add_argument("--text", type=lambda s: parse_list(s), default=list(TEXTS), help="comma-separated text files")
    p.add_argument("--n-ctx", type=int, default=256, help="perplexity chunk length (default %(default)s)")
    p.add_argument("--chunks", type=int, default=4, help="chunks spread over the text, 0 = all (default %(default)s)")
    p.add_argument("--lo-types", type=parse_list, default=list(LO_TYPES), help="comma-separated low types")
    p.add_argument(
        "--thresholds", type=lambda s: parse_list(s, float), default=list(THRESHOLDS), help="comma-separated"
    )
    p.add_argument("--random-archs", type=parse_list, default=list(RANDOM_ARCHS), help="ARCH or ARCH:wide, ...")
    p.add_argument("--random-lo-types", type=parse_list, default=list(RANDOM_LO_TYPES))
    p.add_argument("--random-seqs", type=int, default=4)
    p.add_argument("--random-len", type=int, default=128, help="tokens per sequence, the second half scored")
    p.add_argument("--skip-upcycled", action="store_true")
    p.add_argument("--skip-random", action="store_true")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per worker")
    p.add_argument("--recommend-for", default="q2_K", help="low type the recommendation is for (pymoe's default)")
    p.add_argument("--max-ppl-increase", type=float, default=1.0, help="percent (default %(default)s)")
    p.add_argument("--max-kl", type=float, default=0.01, help="mean KL in nats (default %(default)s)")
    p.add_argument("--json", help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    args.thresholds = [t for t in args.thresholds if t > 0]  # 0 is the reference

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars in the random study
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from pymoe import _core

    t0 = time.monotonic()
    cache = cache_root(args.cache_dir)
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "llama_cpp_commit": _core.llama_commit(),
        "args": {k: v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="pymoe-quality-") as tmp:
        work = Path(tmp)
        if not args.skip_upcycled:
            report["upcycled"] = study_upcycled(args, cache, work, log)
            report["recommendation"] = recommend(report, args.recommend_for, args.max_ppl_increase, args.max_kl)
        if not args.skip_random:
            report["random"] = study_random(args, cache, work, log)
    report["checks"] = run_checks(report)
    report["seconds"] = time.monotonic() - t0
    print_report(report)
    failed = [c for c in report["checks"] if not c["ok"]]
    print(f"\nchecks: {len(report['checks']) - len(failed)} of {len(report['checks'])} passed")
    for c in failed:
        print(f"CHECK FAILED: {c['check']}: {c['detail']}")
    print(f"\ntotal {report['seconds']:.0f}s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
