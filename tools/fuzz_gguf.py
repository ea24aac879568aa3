#!/usr/bin/env python3
"""Fuzz pymoe's model-loading path with mutated GGUF files (models and sidecars).

Every input must end in a clean Python exception (or load and run): never a
crash (a signal, an abort) or a hang:

    python tools/fuzz_gguf.py --seed-model MODEL.gguf [--sidecar MODEL.lo.gguf] [--cases 10000] [--minutes 30]

Mutations, on the bytes and on the parsed file (re-serialised with valid
offsets, so that they get past ggml's parser and reach llama.cpp):

- bytes: truncation (mostly inside the header), bit flips and zeroed runs in
  the header, random bytes appended, the header's integer fields (counts,
  string and array lengths, value types, tensor dims, types and offsets) set
  to boundary values;
- metadata: a scalar value (every integer, float and bool key) set to a
  boundary or nearby value, an element of a numeric array likewise, a string
  value replaced (tokenizer names, rope scaling types, architectures ...), a
  key dropped, a value re-encoded as another numeric type, a vocabulary token
  duplicated;
- tensors: a tensor's type changed (its data resized to the new type, random
  bytes), a dimension changed, its data filled with NaN/inf/random bytes, a
  tensor dropped or renamed.

With --sidecar, the sidecar is mutated while the main file stays intact (the
engine opens both). Cases run in a worker process that loads one mutant after
another (a few hundred per minute on one core); when a case kills the worker
or outlives --timeout, it runs again alone (a case that then finishes within
twice the time counts as "slow", not as a hang), is recorded and kept in
--keep-dir, and a new worker takes the next case:

    python tools/fuzz_gguf.py --replay fuzz-findings/crash-17.gguf [--as-sidecar --seed-model MAIN]

--no-repack loads without llama.cpp's weight repacking. For AddressSanitizer,
run it with a sanitised build of pymoe._core (docs/fuzzing.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The worker: one line per case in (path, sidecar's main or "", "1" to repack),
# one line out per case. Never prints anything else to stdout. Small batches
# and few threads: the cases are tiny, and a busy machine punishes spinning.
WORKER = r"""
import sys
from pymoe import Model
n_threads = int(sys.argv[1])
for line in sys.stdin:
    path, main, repack = line.rstrip("\n").split("\t")
    kw = dict(n_ctx=64, n_batch=32, n_ubatch=32, n_threads=n_threads, repack=repack == "1")
    if main:
        path, kw = main, dict(kw, offload="on", expert_budget=0.5, sidecar=path, lo_threshold=0.5)
    try:
        with Model(path, **kw) as m:
            m.generate("Hello world", max_tokens=2, temperature=0)
        out = "LOADED"
    except (ValueError, RuntimeError, OSError) as e:
        out = "CLEAN " + type(e).__name__ + " " + (str(e).splitlines() or [""])[0][:160]
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
"""

# ------------------------------------------------------------------ the GGUF format

# value type -> struct format of a scalar (8 string, 9 array)
SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
FLOAT_TYPES = (6, 12)

# ggml type id -> (values per block, bytes per block), as gguf-py knows them
try:
    import gguf

    TYPE_SIZES = {int(t): v for t, v in gguf.GGML_QUANT_SIZES.items()}
except ImportError:  # the byte mutations need nothing of it
    TYPE_SIZES = {0: (1, 4), 1: (1, 2), 8: (32, 34), 28: (1, 8), 30: (1, 2)}


@dataclass
class KV:
    key: str
    vtype: int
    value: bytes  # the encoded value (for arrays: element type, count, elements)
    n: int = 0  # arrays: element count
    etype: int = -1  # arrays: element type


@dataclass
class Tensor:
    name: str
    dims: list[int]
    type: int
    data: bytes


@dataclass
class GGUF:
    version: int
    kvs: list[KV]
    tensors: list[Tensor]
    alignment: int = 32
    extra: bytes = field(default=b"")  # bytes after the last tensor

    def encode(self) -> bytes:
        out = bytearray(b"GGUF")
        out += struct.pack("<IQQ", self.version, len(self.tensors), len(self.kvs))
        for kv in self.kvs:
            out += _str(kv.key) + struct.pack("<I", kv.vtype) + kv.value
        offset, data = 0, bytearray()
        for t in self.tensors:
            out += _str(t.name) + struct.pack("<I", len(t.dims)) + b"".join(struct.pack("<q", d) for d in t.dims)
            out += struct.pack("<IQ", t.type, offset)
            data += t.data + bytes(-len(t.data) % self.alignment)
            offset = len(data)
        out += bytes(-len(out) % self.alignment)
        return bytes(out + data + self.extra)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def tensor_nbytes(dims: list[int], ggml_type: int) -> int | None:
    if ggml_type not in TYPE_SIZES or not dims or dims[0] % TYPE_SIZES[ggml_type][0]:
        return None
    block, size = TYPE_SIZES[ggml_type]
    return math.prod(dims[1:]) * dims[0] // block * size


def parse(data: bytes) -> GGUF:
    """The structure of a valid GGUF (the seed), every value kept encoded."""
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, pos)
    pos += 20

    def string(at: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", data, at)
        return data[at + 8 : at + 8 + n], at + 8 + n

    def skip(t: int, at: int) -> int:
        if t == 8:
            return string(at)[1]
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, at)
            at += 12
            if et in SCALAR:
                return at + n * struct.calcsize(SCALAR[et])
            for _ in range(n):
                at = skip(et, at)
            return at
        return at + struct.calcsize(SCALAR[t])

    kvs = []
    for _ in range(n_kv):
        key, pos = string(pos)
        (t,) = struct.unpack_from("<I", data, pos)
        end = skip(t, pos + 4)
        kv = KV(key.decode(), t, data[pos + 4 : end])
        if t == 9:
            kv.etype, kv.n = struct.unpack_from("<IQ", data, pos + 4)
        kvs.append(kv)
        pos = end
    alignment = 32
    for kv in kvs:
        if kv.key == "general.alignment" and kv.vtype == 4:
            (alignment,) = struct.unpack("<I", kv.value)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (nd,) = struct.unpack_from("<I", data, pos)
        dims = list(struct.unpack_from(f"<{nd}q", data, pos + 4))
        pos += 4 + 8 * nd
        t, off = struct.unpack_from("<IQ", data, pos)
        pos += 12
        infos.append((name.decode(), dims, t, off))
    base = pos + (-pos % alignment)
    tensors = []
    for name, dims, t, off in infos:
        n = tensor_nbytes(dims, t)
        if n is None:
            raise ValueError(f"seed tensor {name} has a type this tool does not know ({t})")
        tensors.append(Tensor(name, dims, t, data[base + off : base + off + n]))
    return GGUF(version, kvs, tensors, alignment)


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
            return at + struct.calcsize(SCALAR[t])

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


# ------------------------------------------------------------------ mutations

INTERESTING = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 255, 256, 0x7F, 0x80, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 28, 29, 30, 39, 40, 41, 1 << 40]  # fmt: skip
SMALL = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 32, 63, 64, 100, 127, 128, 255, 256, 511, 512, 513, 1023, 1024,
         1025, 4096, 65535, 65536, 100000, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, -1, -2, -128,
         -(2**31)]  # fmt: skip
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, 1e30, 1e-6, float("inf"), float("-inf"), float("nan"), 3.4e38]
STRINGS = ["", "llama", "gpt2", "bert", "t5", "rwkv", "none", "no_vocab", "test", "plamo2", "gemma4", "whitespace",
           "linear", "yarn", "longrope", "unknown", "qwen2moe", "qwen3moe", "olmoe", "deepseek2", "gpt-oss", "mamba",
           "pymoe-sidecar", "model", "x" * 1000, "\xff\xfe", "{{ messages }}", "<|im_start|>"]  # fmt: skip


def _fit(value: int, fmt: str) -> int:
    """Wraps an integer into the range of a struct integer format."""
    bits = 8 * struct.calcsize(fmt)
    value &= (1 << bits) - 1
    if fmt[-1].islower() and value >= 1 << (bits - 1):  # signed
        value -= 1 << bits
    return value


def _scalar_value(fmt: str, old: bytes, rng: random.Random) -> bytes:
    """Another value for an encoded scalar (a different one, when it can)."""
    for _ in range(8):
        new = _any_value(fmt, old, rng)
        if new != old:
            return new
    return new


def _any_value(fmt: str, old: bytes, rng: random.Random) -> bytes:
    if fmt == "<?":
        return bytes([rng.choice([0, 1, 2, 255])])
    if fmt in ("<f", "<d"):
        (v,) = struct.unpack(fmt, old)
        choice = rng.choice([*FLOATS, v * 2, -v, v + 1])
        return struct.pack(fmt, choice)
    (v,) = struct.unpack(fmt, old)
    choice = rng.choice([*SMALL, v + 1, v - 1, v * 2, v // 2, v + rng.randint(-8, 8)])
    return struct.pack(fmt, _fit(choice, fmt))


def _random_bytes(n: int, rng: random.Random) -> bytes:
    return rng.randbytes(n)


def _string_items(kv: KV) -> list[bytes]:
    """The encoded elements of a string array."""
    items, at = [], 12
    for _ in range(kv.n):
        (n,) = struct.unpack_from("<Q", kv.value, at)
        items.append(kv.value[at : at + 8 + n])
        at += 8 + n
    return items


def mutate_parsed(g: GGUF, rng: random.Random, kind: str) -> str:
    """Applies one structural mutation to `g` in place; returns what it did."""
    if kind == "scalar":
        kvs = [kv for kv in g.kvs if kv.vtype in SCALAR]
        kv = rng.choice(kvs)
        kv.value = _scalar_value(SCALAR[kv.vtype], kv.value, rng)
        return f"scalar {kv.key} = {kv.value.hex()}"
    if kind == "array":
        kvs = [kv for kv in g.kvs if kv.vtype == 9 and kv.etype in SCALAR and kv.n > 0]
        if not kvs:
            return "array: none"
        kv = rng.choice(kvs)
        size = struct.calcsize(SCALAR[kv.etype])
        i = rng.randrange(kv.n)
        at = 12 + i * size
        new = _scalar_value(SCALAR[kv.etype], kv.value[at : at + size], rng)
        kv.value = kv.value[:at] + new + kv.value[at + size :]
        return f"array {kv.key}[{i}] = {new.hex()}"
    if kind == "string":
        s = rng.choice(STRINGS)
        new = b"\xff\xfe" if s == "\xff\xfe" else s.encode()  # the former is not UTF-8
        arrays = [kv for kv in g.kvs if kv.vtype == 9 and kv.etype == 8 and kv.n > 0]
        if arrays and rng.random() < 0.3:  # an element of a string array (a token, a merge)
            kv = rng.choice(arrays)
            items = _string_items(kv)
            i = rng.randrange(kv.n)
            items[i] = _str(new)
            kv.value = kv.value[:12] + b"".join(items)
            return f"string {kv.key}[{i}] = {s[:20]!r}"
        kv = rng.choice([kv for kv in g.kvs if kv.vtype == 8])
        kv.value = _str(new)
        return f"string {kv.key} = {s[:20]!r}"
    if kind == "drop-key":
        kv = g.kvs.pop(rng.randrange(len(g.kvs)))
        return f"drop key {kv.key}"
    if kind == "retype":
        kvs = [kv for kv in g.kvs if kv.vtype in SCALAR and kv.vtype != 7]
        kv = rng.choice(kvs)
        (v,) = struct.unpack(SCALAR[kv.vtype], kv.value)
        t = rng.choice([t for t in (*INT_TYPES, *FLOAT_TYPES) if t != kv.vtype])
        fmt = SCALAR[t]
        as_int = int(v) if math.isfinite(v) else 0
        kv.vtype, kv.value = t, struct.pack(fmt, float(v) if t in FLOAT_TYPES else _fit(as_int, fmt))
        return f"retype {kv.key} as type {t}"
    if kind == "dup-token":
        kv = next((kv for kv in g.kvs if kv.key == "tokenizer.ggml.tokens" and kv.vtype == 9), None)
        if kv is None or kv.n < 2:
            return "dup-token: none"
        items = _string_items(kv)
        i, j = rng.sample(range(kv.n), 2)
        items[j] = items[i]
        kv.value = kv.value[:12] + b"".join(items)
        return f"token {j} = token {i}"
    if not g.tensors:
        return f"{kind}: no tensors"
    t = rng.choice(g.tensors)
    if kind == "tensor-type":
        types = [ty for ty in TYPE_SIZES if ty != t.type and tensor_nbytes(t.dims, ty) is not None]
        t.type = rng.choice(types)
        n = tensor_nbytes(t.dims, t.type) or 0
        t.data = _random_bytes(n, rng) if rng.random() < 0.5 else bytes(n)
        return f"tensor {t.name} type {t.type}"
    if kind == "tensor-dim":
        d = rng.randrange(len(t.dims))
        old = t.dims[d]
        new = rng.choice([1, 2, old * 2, max(1, old // 2), old + TYPE_SIZES[t.type][0], 256])
        dims = list(t.dims)
        dims[d] = new
        n = tensor_nbytes(dims, t.type)
        if n is None or n > 64 << 20:
            return f"tensor-dim: {t.name} unchanged"
        t.dims, t.data = dims, _random_bytes(n, rng)
        return f"tensor {t.name} dim {d} {old} -> {new}"
    if kind == "tensor-data":
        fill = rng.choice([b"\xff", b"\x7f\x80\x00\x00"[::-1], b"\x00\x7c", None])  # NaN, inf (f32), inf (f16)
        n = len(t.data)
        t.data = _random_bytes(n, rng) if fill is None else (fill * (n // len(fill) + 1))[:n]
        return f"tensor {t.name} data {fill!r}"
    if kind == "tensor-drop":
        g.tensors.remove(t)
        return f"drop tensor {t.name}"
    # tensor-rename
    other = rng.choice([o for o in g.tensors if o is not t] or [t])
    names = {other.name, t.name.replace("blk.", "blk.9"), "blk.0.unknown.weight", t.name + ".x"} - {t.name}
    old, t.name = t.name, rng.choice(sorted(names))
    return f"rename tensor {old} -> {t.name}"


BYTE_KINDS = ["truncate", "flip", "field", "zero", "append"]
PARSED_KINDS = ["scalar", "array", "string", "drop-key", "retype", "dup-token", "tensor-type", "tensor-dim",
                "tensor-data", "tensor-drop", "tensor-rename"]  # fmt: skip
# scalar metadata and tensor types: the mutations that reach llama.cpp's asserts
WEIGHTS = {"truncate": 1, "flip": 1, "field": 2, "zero": 1, "append": 1, "scalar": 6, "array": 2, "string": 2,
           "drop-key": 1, "retype": 1, "dup-token": 1, "tensor-type": 4, "tensor-dim": 1, "tensor-data": 1,
           "tensor-drop": 1, "tensor-rename": 1}  # fmt: skip


def mutate(
    data: bytes, seed_gguf: GGUF, fields: list[tuple[int, int, str]], rng: random.Random, kinds: list[str]
) -> tuple[bytes, str, str]:
    """One mutant of `data` (whose structure is `seed_gguf`): its bytes, the kind of mutation and what it did."""
    for _ in range(16):  # a kind that does not apply (no vocabulary in a sidecar ...) changes nothing: another
        kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
        mutated, how = _mutate(data, seed_gguf, fields, rng, kind)
        if mutated != data:
            break
    return mutated, kind, how


def _mutate(
    data: bytes, seed_gguf: GGUF, fields: list[tuple[int, int, str]], rng: random.Random, kind: str
) -> tuple[bytes, str]:
    if kind in PARSED_KINDS:
        g = GGUF(
            seed_gguf.version,
            [KV(kv.key, kv.vtype, kv.value, kv.n, kv.etype) for kv in seed_gguf.kvs],
            [Tensor(t.name, list(t.dims), t.type, t.data) for t in seed_gguf.tensors],
            seed_gguf.alignment,
        )
        how = mutate_parsed(g, rng, kind)
        return g.encode(), how
    header_end = max((o + s for o, s, _ in fields), default=min(len(data), 4096))
    b = bytearray(data)
    if kind == "truncate":
        cut = rng.randrange(0, header_end + 64) if rng.random() < 0.7 else rng.randrange(0, len(data))
        return bytes(b[:cut]), f"truncate at {cut}"
    if kind == "flip":
        spots = [rng.randrange(0, header_end) for _ in range(rng.randint(1, 8))]
        for at in spots:
            b[at] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip bits at {spots}"
    if kind == "field" and fields:
        at, size, what = rng.choice(fields)
        value = rng.choice(INTERESTING) & ((1 << (8 * size)) - 1)
        b[at : at + size] = value.to_bytes(size, "little")
        return bytes(b), f"{what} at {at} = {value}"
    if kind == "zero":
        at, n = rng.randrange(0, header_end), rng.randint(1, 64)
        b[at : at + n] = bytes(min(n, len(b) - at))
        return bytes(b), f"zero {n} bytes at {at}"
    extra = _random_bytes(rng.randint(1, 4096), rng)
    return bytes(b) + extra, f"append {len(extra)} bytes"


# ------------------------------------------------------------------ running cases


class Worker:
    """A process that loads mutants one after another until one kills it."""

    def __init__(self, n_threads: int = 1) -> None:
        self.err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the worker); a pipe could fill up and stall the worker
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(n_threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            cwd=tempfile.gettempdir(),
            env=dict(os.environ, GGML_NO_BACKTRACE="1"),  # ggml's abort would run gdb, which writes to stdout
        )
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def run(self, path: Path, main: Path | None, repack: bool, timeout: float) -> tuple[str, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{path}\t{main or ''}\t{'1' if repack else '0'}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        if not self.sel.select(timeout):
            self.close()
            return "hang", f"no result in {timeout:.0f} s"
        line = self.proc.stdout.readline()
        if not line:
            return self._died()
        if line.startswith("LOADED"):
            return "loaded", line.strip()
        if line.startswith("CLEAN"):
            return "clean", line.strip()
        try:  # anything else comes from a dying process
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self._died()

    def _died(self) -> tuple[str, str]:
        rc = self.proc.wait()
        self.err.seek(0)
        err = self.err.read().strip()[-400:]
        return "crash", (f"signal {-rc}" if rc < 0 else f"exit {rc}") + f": {err}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.err):
            if f is not None:
                f.close()


def run_one(path: Path, main: Path | None, repack: bool, timeout: float, n_threads: int = 1) -> tuple[str, str]:
    w = Worker(n_threads)
    try:
        return w.run(path, main, repack, timeout)
    finally:
        w.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-model", type=Path, required=True, help="a valid GGUF to mutate (small: cases load it)")
    ap.add_argument("--sidecar", type=Path, help="mutate this sidecar of the seed model instead of the model")
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-repack", action="store_true", help="load without llama.cpp's weight repacking")
    ap.add_argument("--threads", type=int, default=1, help="threads per case (default: %(default)s)")
    ap.add_argument(
        "--mutations",
        default=",".join(BYTE_KINDS + PARSED_KINDS),
        help="comma-separated kinds to use (default: all): " + ", ".join(BYTE_KINDS + PARSED_KINDS),
    )
    ap.add_argument("--keep-dir", type=Path, default=Path("fuzz-findings"))
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--replay", type=Path, help="run one saved input and print its outcome")
    ap.add_argument("--as-sidecar", action="store_true", help="with --replay: the input is a sidecar of --seed-model")
    args = ap.parse_args()
    repack = not args.no_repack
    seed_model = args.seed_model.resolve()  # the worker runs in another directory

    if args.replay:
        main = seed_model if args.as_sidecar else None
        outcome, detail = run_one(args.replay.resolve(), main, repack, args.timeout, args.threads)
        print(outcome, detail)
        return 0 if outcome in ("clean", "loaded") else 1

    kinds = [k.strip() for k in args.mutations.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(WEIGHTS))
    if unknown:
        ap.error(f"unknown mutation kind(s) {', '.join(unknown)}")
    target = (args.sidecar or args.seed_model).resolve()
    main_file = seed_model if args.sidecar else None
    data = target.read_bytes()
    seed_gguf = parse(data)
    fields = header_fields(data)
    rng = random.Random(args.seed)
    counts: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    findings = []
    deadline = time.monotonic() + 60 * args.minutes
    t0 = time.monotonic()
    shm = Path("/dev/shm")
    tmp = tempfile.mkdtemp(prefix="pymoe-fuzz-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    worker: Worker | None = None
    try:
        for i in range(args.cases):
            if time.monotonic() > deadline:
                break
            mutated, kind, how = mutate(data, seed_gguf, fields, rng, kinds)
            path = Path(tmp) / f"case{i}.gguf"
            path.write_bytes(mutated)
            if worker is None or not worker.alive:
                worker = Worker(args.threads)
            outcome, detail = worker.run(path, main_file, repack, args.timeout)
            counts[outcome] = counts.get(outcome, 0) + 1
            by_kind.setdefault(kind, {}).setdefault(outcome, 0)
            by_kind[kind][outcome] += 1
            if outcome in ("crash", "hang"):
                worker.close()
                worker = None
                # again, alone and with twice the time: a busy machine makes slow cases look hung
                again, again_detail = run_one(path, main_file, repack, 2 * args.timeout, args.threads)
                if outcome == "hang" and again != "hang":
                    counts["hang"] -= 1
                    counts["slow"] = counts.get("slow", 0) + 1
                    by_kind[kind]["hang"] -= 1
                    by_kind[kind]["slow"] = by_kind[kind].get("slow", 0) + 1
                    print(f"case {i}: slow, not hung ({how}): {again_detail}", file=sys.stderr)
                    path.unlink()
                    continue
                detail += f" | alone: {again} {again_detail[:200]}"
                args.keep_dir.mkdir(parents=True, exist_ok=True)
                kept = args.keep_dir / f"{outcome}-{i}.gguf"
                shutil.copy(path, kept)
                findings.append({"case": i, "mutation": how, "outcome": outcome, "detail": detail, "file": str(kept)})
                print(f"case {i}: {outcome}: {how}: {detail}", file=sys.stderr)
            path.unlink()
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(counts.values())
    summary = {
        "target": str(target),
        "cases": total,
        "seconds": round(time.monotonic() - t0, 1),
        "repack": repack,
        "outcomes": counts,
        "by_mutation": by_kind,
        "findings": findings,
    }
    print(json.dumps({k: v for k, v in summary.items() if k not in ("findings", "by_mutation")}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0 if not findings else 1


if __name__ == "__main__":
    sys.exit(main())
