"""Time and peak memory of `pymoe convert` against llama.cpp's route to the
same file, convert_hf_to_gguf.py (to bf16) followed by llama-quantize, on a
synthetic Mixtral-layout checkpoint of >= 1 GB (bf16 safetensors in shards).

Both produce experts in Q4_K and every other weight in Q8_0 (norms and routers
in F32); the script checks that the two files hold the same tensors with the
same types and counts the tensors whose bytes are identical.

    tools/build_llama_tools.sh                  # llama-quantize, once (~4 min)
    python tools/bench_convert.py               # ~1.2 GB checkpoint in build/bench-convert
    python tools/bench_convert.py --layers 16   # bigger

Needs the test extras (transformers, tokenizers: the checkpoint's tokenizer is
trained like the tests' one) and third_party/llama.cpp. Each tool runs in its
own process; peak memory is that process's maximum resident set (wait4), and
the checkpoint is evicted from the page cache before each run so that every
tool reads it from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pagecache import evict  # tools/, beside this script

from pymoe._units import format_bytes

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP = ROOT / "third_party" / "llama.cpp"
QUANTIZE = ROOT / "build" / "llama-tools" / "bin" / "llama-quantize"
SHARD_BYTES = 500 << 20


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, a in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in tensors.values():
            a.tofile(f)


def make_checkpoint(out: Path, *, hidden: int, ff: int, n_expert: int, layers: int, seed: int = 0) -> int:
    """A random Mixtral-layout bf16 checkpoint (per-expert tensors, as hub
    Mixtral ships them) with a trained byte-level BPE tokenizer; returns its bytes."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    n_head, n_kv = hidden // 128, max(1, hidden // 512)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": 128,
        "num_local_experts": n_expert,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return bf16_bits(rng.standard_normal(shape, dtype=np.float32) * 0.02)

    def tensors():  # yields (name, array)
        yield "model.embed_tokens.weight", rand(len(tok), hidden)
        for i in range(layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", bf16_bits(np.ones(hidden, np.float32))
            yield f"{p}.post_attention_layernorm.weight", bf16_bits(np.ones(hidden, np.float32))
            yield f"{p}.self_attn.q_proj.weight", rand(n_head * 128, hidden)
            yield f"{p}.self_attn.k_proj.weight", rand(n_kv * 128, hidden)
            yield f"{p}.self_attn.v_proj.weight", rand(n_kv * 128, hidden)
            yield f"{p}.self_attn.o_proj.weight", rand(hidden, n_head * 128)
            yield f"{p}.block_sparse_moe.gate.weight", rand(n_expert, hidden)
            for e in range(n_expert):
                q = f"{p}.block_sparse_moe.experts.{e}"
                yield f"{q}.w1.weight", rand(ff, hidden)
                yield f"{q}.w2.weight", rand(hidden, ff)
                yield f"{q}.w3.weight", rand(ff, hidden)
        yield "model.norm.weight", bf16_bits(np.ones(hidden, np.float32))
        yield "lm_head.weight", rand(len(tok), hidden)

    shards: list[dict[str, np.ndarray]] = [{}]
    for name, a in tensors():
        if shards[-1] and sum(x.nbytes for x in shards[-1].values()) + a.nbytes > SHARD_BYTES:
            shards.append({})
        shards[-1][name] = a
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, shard)
        weight_map.update(dict.fromkeys(shard, fname))
        total += sum(a.nbytes for a in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def measure(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall time, CPU time (user + system, less sensitive to other load on
    the machine) and peak RSS (MiB) of one command, run as a child process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output.decode(errors='replace')[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def compare(ours: Path, theirs: Path) -> dict[str, object]:
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    if a.keys() != b.keys():
        sys.exit(f"the two files hold different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    types = {n: (a[n].tensor_type.name, b[n].tensor_type.name) for n in a}
    differ = {n: t for n, t in types.items() if t[0] != t[1]}
    if differ:
        sys.exit(f"the two files store tensors in different types: {list(differ.items())[:5]}")
    same = sum(np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)) for n in a)
    by_type: dict[str, int] = {}
    for t, _ in types.values():
        by_type[t] = by_type.get(t, 0) + 1
    return {"tensors": len(a), "types": by_type, "identical_bytes": int(same)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-convert", help="scratch folder")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ff", type=int, default=2816, help="expert feed-forward size")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool; the fastest counts (default: 3)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dims = {"hidden": args.hidden, "ff": args.ff, "n_expert": args.experts, "layers": args.layers}
    if args.make_only:  # in a child process, see below
        print(make_checkpoint(args.work / "checkpoint", **dims))
        return
    if not QUANTIZE.is_file():
        sys.exit(f"{QUANTIZE} is missing; run tools/build_llama_tools.sh")
    work: Path = args.work
    ckpt = work / "checkpoint"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    # in a child: a process's peak RSS survives fork and exec, so the tools must
    # be started from a parent that never held the checkpoint in memory
    make = [sys.executable, __file__, "--make-only", "--work", str(work)]
    make += ["--hidden", str(args.hidden), "--ff", str(args.ff), "--experts", str(args.experts)]
    size = int(subprocess.run([*make, "--layers", str(args.layers)], check=True, capture_output=True, text=True).stdout)
    print(f"checkpoint: {format_bytes(size)} bf16 in {time.monotonic() - t0:.0f} s ({ckpt})", flush=True)
    print(f"this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)

    env = {**os.environ, "PYTHONPATH": ""}
    ours, with_side = work / "pymoe.gguf", work / "pymoe-sidecar.gguf"
    bf16, theirs = work / "upstream-bf16.gguf", work / "upstream-q4_K.gguf"
    pymoe = [
        sys.executable,
        "-m",
        "pymoe",
        "convert",
        str(ckpt),
        "--outtype",
        "q8_0",
        "--expert-type",
        "q4_K",
        "--force",
    ]
    upstream = [sys.executable, str(ROOT / "tests" / "llama_cpp_convert.py"), str(ckpt), str(bf16), "--outtype", "bf16"]
    quantize = [
        str(QUANTIZE),
        "--pure",  # one type for every weight ...
        "--tensor-type",
        "ffn_(gate|up|down)_exps=q4_K",  # ... but the experts
        "--output-tensor-type",
        "q8_0",
        "--token-embedding-type",
        "q8_0",
        str(bf16),
        str(theirs),
        "q8_0",
    ]
    runs: dict[str, list[dict[str, float]]] = {}
    for i in range(args.repeat):  # the tools take turns, so that a busy moment hits each alike
        for name, steps in (
            ("pymoe convert", [[*pymoe, "-o", str(ours), "--no-sidecar"]]),
            ("pymoe convert + q2_K sidecar", [[*pymoe, "-o", str(with_side), "--lo-type", "q2_K"]]),
            # the pipeline as a user runs it: the bf16 file is fresh in the page cache for llama-quantize
            ("convert_hf_to_gguf.py + llama-quantize", [upstream, quantize]),
        ):
            evict(ckpt)
            load = os.getloadavg()[0]
            parts = [measure(cmd, cwd=work, env=env) for cmd in steps]
            run = {
                "seconds": sum(p["seconds"] for p in parts),
                "cpu_seconds": sum(p["cpu_seconds"] for p in parts),
                "peak_rss_mib": max(p["peak_rss_mib"] for p in parts),
                "load_before": load,
            }
            for j, p in enumerate(parts):
                run[f"step{j + 1}_seconds"], run[f"step{j + 1}_peak_rss_mib"] = p["seconds"], p["peak_rss_mib"]
            runs.setdefault(name, []).append(run)
            print(f"run {i + 1}: {name}: {run}", flush=True)
    results = {
        name: {
            "seconds": min(r["seconds"] for r in rs),
            "cpu_seconds": min(r["cpu_seconds"] for r in rs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "fastest": min(rs, key=lambda r: r["seconds"]),
            "all_seconds": [round(r["seconds"], 2) for r in rs],
        }
        for name, rs in runs.items()
    }
    # the sidecar of a file pymoe did not write: llama-quantize's own Q4_K_M mix
    q4km = work / "upstream-Q4_K_M.gguf"
    measure([str(QUANTIZE), str(bf16), str(q4km), "Q4_K_M"], cwd=work)
    q4km_side = [sys.executable, "-m", "pymoe", "convert", str(q4km), "--lo-type", "q2_K", "--force"]
    results["pymoe convert Q4_K_M.gguf (sidecar only)"] = side_only = measure(q4km_side, cwd=work, env=env)
    print("sidecar of a Q4_K_M:", side_only, flush=True)
    from pymoe.sidecar import check_sidecar

    side_info = check_sidecar(q4km, work / "upstream-Q4_K_M.lo.gguf")
    same = compare(ours, theirs)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_after": os.getloadavg(),
        "checkpoint": {
            "bytes": size,
            "layout": f"Mixtral, hidden {args.hidden}, expert ff {args.ff}, {args.experts} experts, "
            f"{args.layers} layers",
        },
        "outputs": {
            "pymoe.gguf": ours.stat().st_size,
            "upstream-q4_K.gguf": theirs.stat().st_size,
            "sidecar": (work / "pymoe-sidecar.lo.gguf").stat().st_size,
            "upstream-Q4_K_M.gguf": q4km.stat().st_size,
            "upstream-Q4_K_M.lo.gguf": side_info.path.stat().st_size,
        },
        "q4_k_m_sidecar": {
            "main_types": sorted({t.main_type for t in side_info.tensors}),
            "lo_type": side_info.lo_type,
        },
        "comparison": same,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    print(f"\n| tool | wall (s), best of {args.repeat} | CPU (s) | peak RSS (MiB) |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    fastest = results["convert_hf_to_gguf.py + llama-quantize"]["fastest"]
    for j, step in enumerate(("convert_hf_to_gguf.py --outtype bf16", "llama-quantize"), start=1):
        print(f"| … {step} | {fastest[f'step{j}_seconds']:.1f} | | {fastest[f'step{j}_peak_rss_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
