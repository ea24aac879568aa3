#!/usr/bin/env python3
"""Fuzz pymoe's model-loading path with truncated and mutated GGUF files.

Every input must end in a clean Python exception (or load and run): never a
crash (a signal, an abort) or a hang. Each case runs in its own subprocess
with a time limit:

    python tools/fuzz_gguf.py --seed-model MODEL.gguf [--sidecar MODEL.lo.gguf] [--cases 300] [--minutes 10]

Mutations: truncation at a random point (mostly inside the header), random
byte flips in the header, overwritten integer fields (counts, string lengths,
dimensions, tensor types and offsets, all found by parsing the header), and
random bytes appended. With --sidecar, the same mutations are applied to the
sidecar while the main file stays intact (the engine opens both).

Results are printed per outcome; crashing inputs are kept in --keep-dir so
that they can be replayed:  python tools/fuzz_gguf.py --replay FILE [--as-sidecar --seed-model MAIN].
For AddressSanitizer, run it with a sanitised build of pymoe._core preloaded
(see docs/fuzzing.md).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys
from pymoe import Model
path, sidecar = sys.argv[1], (sys.argv[2] or None)
kw = dict(n_ctx=64, offload="on", expert_budget=0.5, sidecar=sidecar) if sidecar else dict(n_ctx=64)
try:
    with Model(path, **kw) as m:
        m.generate([1, 2, 3], max_tokens=2, temperature=0)
    print("LOADED")
except (ValueError, RuntimeError, OSError) as e:
    print("CLEAN", type(e).__name__, str(e).splitlines()[0][:160])
"""


def header_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, size, what) of the integer fields of a GGUF header: counts,
    string lengths, array lengths, tensor dims, types and offsets."""
    out: list[tuple[int, int, str]] = []
    pos = 8

    def u64(at: int) -> int:
        return struct.unpack_from("<Q", data, at)[0]

    try:
        n_tensors, n_kv = u64(pos), u64(pos + 8)
        out += [(pos, 8, "n_tensors"), (pos + 8, 8, "n_kv")]
        pos += 16
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

        def skip_value(t: int, at: int) -> int:
            if t == 8:  # string
                out.append((at, 8, "string length"))
                return at + 8 + u64(at)
            if t == 9:  # array
                out.append((at, 4, "array type"))
                out.append((at + 4, 8, "array length"))
                at_t, n = struct.unpack_from("<I", data, at)[0], u64(at + 4)
                at += 12
                for _ in range(n):
                    at = skip_value(at_t, at)
                return at
            return at + sizes[t]

        for _ in range(n_kv):
            out.append((pos, 8, "key length"))
            pos += 8 + u64(pos)
            out.append((pos, 4, "value type"))
            t = struct.unpack_from("<I", data, pos)[0]
            pos = skip_value(t, pos + 4)
        for _ in range(n_tensors):
            out.append((pos, 8, "tensor name length"))
            pos += 8 + u64(pos)
            out.append((pos, 4, "n_dims"))
            nd = struct.unpack_from("<I", data, pos)[0]
            pos += 4
            for d in range(nd):
                out.append((pos + 8 * d, 8, "tensor dim"))
            pos += 8 * nd
            out += [(pos, 4, "tensor type"), (pos + 4, 8, "tensor offset")]
            pos += 12
    except (struct.error, KeyError):
        pass
    return out


INTERESTING = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 255, 256, 0x7F, 0x80, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 28, 29, 30, 39, 40, 41, 1 << 40]  # fmt: skip


def mutate(data: bytes, fields: list[tuple[int, int, str]], rng: random.Random) -> tuple[bytes, str]:
    header_end = max((o + s for o, s, _ in fields), default=min(len(data), 4096))
    kind = rng.choice(["truncate", "flip", "field", "field", "field", "append", "zero"])
    b = bytearray(data)
    if kind == "truncate":
        cut = rng.randrange(0, header_end + 64) if rng.random() < 0.7 else rng.randrange(0, len(data))
        return bytes(b[:cut]), f"truncate at {cut}"
    if kind == "flip":
        n = rng.randint(1, 8)
        spots = [rng.randrange(0, header_end) for _ in range(n)]
        for at in spots:
            b[at] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip bits at {spots}"
    if kind == "field" and fields:
        at, size, what = rng.choice(fields)
        value = rng.choice(INTERESTING) & ((1 << (8 * size)) - 1)
        b[at : at + size] = value.to_bytes(size, "little")
        return bytes(b), f"{what} at {at} = {value}"
    if kind == "zero":
        at = rng.randrange(0, header_end)
        n = rng.randint(1, 64)
        b[at : at + n] = bytes(min(n, len(b) - at))
        return bytes(b), f"zero {n} bytes at {at}"
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
    return bytes(b) + extra, f"append {len(extra)} bytes"


def run_case(path: Path, sidecar_main: Path | None, timeout: float) -> tuple[str, str]:
    args = [str(sidecar_main), str(path)] if sidecar_main else [str(path), ""]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired:
        return "hang", f"no result in {timeout:.0f} s"
    out = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and out and out[-1].startswith(("CLEAN", "LOADED")):
        return ("clean" if out[-1].startswith("CLEAN") else "loaded"), out[-1]
    if proc.returncode < 0:
        return "crash", f"signal {-proc.returncode}: {proc.stderr.strip()[-300:]}"
    return "crash", f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-model", type=Path, required=True, help="a valid GGUF to mutate (small: cases load it)")
    ap.add_argument("--sidecar", type=Path, help="mutate this sidecar of the seed model instead of the model")
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-dir", type=Path, default=Path("fuzz-findings"))
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--replay", type=Path, help="run one saved input and print its outcome")
    ap.add_argument("--as-sidecar", action="store_true", help="with --replay: the input is a sidecar of --seed-model")
    args = ap.parse_args()

    if args.replay:
        outcome, detail = run_case(args.replay, args.seed_model if args.as_sidecar else None, args.timeout)
        print(outcome, detail)
        return 0 if outcome in ("clean", "loaded") else 1

    target = args.sidecar or args.seed_model
    data = target.read_bytes()
    fields = header_fields(data)
    rng = random.Random(args.seed)
    counts: dict[str, int] = {}
    findings = []
    deadline = time.monotonic() + 60 * args.minutes
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cases):
            if time.monotonic() > deadline:
                break
            mutated, how = mutate(data, fields, rng)
            path = Path(tmp) / f"case{i}.gguf"
            path.write_bytes(mutated)
            outcome, detail = run_case(path, args.seed_model if args.sidecar else None, args.timeout)
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome in ("crash", "hang"):
                args.keep_dir.mkdir(parents=True, exist_ok=True)
                kept = args.keep_dir / f"{outcome}-{i}.gguf"
                shutil.copy(path, kept)
                findings.append({"case": i, "mutation": how, "outcome": outcome, "detail": detail, "file": str(kept)})
                print(f"case {i}: {outcome}: {how}: {detail}", file=sys.stderr)
            path.unlink()
    total = sum(counts.values())
    summary = {"target": str(target), "cases": total, "outcomes": counts, "findings": findings}
    print(json.dumps({k: v for k, v in summary.items() if k != "findings"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0 if not findings else 1


if __name__ == "__main__":
    sys.exit(main())
