"""`convert` (Hugging Face checkpoint -> GGUF + low-precision expert sidecar)
and `build_sidecar` (the sidecar alone, for a GGUF that already exists)."""

from __future__ import annotations

import logging
import os
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .. import _core
from .. import sidecar as sc
from .._atomic import atomic_output, check_output_path
from ..gguf_info import EXPERT_TENSOR, check_gguf_path
from . import hub, qtypes
from .base import MoEConverter, TensorPlan, converter_class
from .checkpoint import Checkpoint, CheckpointError
from .vocab import load_vocab
from .writer import GGUFStream, OutputTensor, Progress, patch_header, write_tensors

logger = logging.getLogger("pymoe.convert")

DEFAULT_OUTTYPE = "q8_0"
DEFAULT_EXPERT_TYPE = "q4_K"
DEFAULT_LO_TYPE = "q2_K"

# tensors llama.cpp keeps in float32 whatever the file type: norms, biases,
# routers (their logits pick the experts), sinks and other vectors
_ALWAYS_F32 = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


@dataclass
class TensorRecord:
    name: str
    shape: tuple[int, ...]  # ggml order (ne), as `pymoe info` and llama.cpp print it
    type: str
    wanted: str
    lo_type: str | None = None
    lo_wanted: str | None = None


@dataclass
class ConvertResult:
    output: Path
    sidecar: Path | None
    tensors: list[TensorRecord]
    output_bytes: int
    sidecar_bytes: int
    seconds: float
    skipped: list[str] = field(default_factory=list)  # checkpoint tensors llama.cpp does not use

    @property
    def fallbacks(self) -> list[tuple[str, str, str]]:
        """(tensor, wanted type, type used) for each tensor whose row length did not fit a type's block."""
        out = [(t.name, t.wanted, t.type) for t in self.tensors if t.type != t.wanted]
        for t in self.tensors:
            if t.lo_type is not None and t.lo_wanted is not None and t.lo_type != t.lo_wanted:
                out.append((f"{t.name} (sidecar)", t.lo_wanted, t.lo_type))
        return out


def is_quantisable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor takes the file's type (else it stays float32)."""
    return len(shape) >= 2 and name.endswith(".weight") and not name.endswith(_ALWAYS_F32)


def choose_types(plans: list[TensorPlan], outtype: str, expert_type: str, lo_type: str | None) -> list[OutputTensor]:
    out = []
    for p in plans:
        m = EXPERT_TENSOR.match(p.name)
        if m is not None and m.group(3) == "weight":
            lo = qtypes.fit_type(lo_type, p.row_length) if lo_type else None
            out.append(OutputTensor(p, qtypes.fit_type(expert_type, p.row_length), lo))
        elif is_quantisable(p.name, p.shape):
            out.append(OutputTensor(p, qtypes.fit_type(outtype, p.row_length)))
        else:
            out.append(OutputTensor(p, qtypes.TypeChoice("f32", "f32")))
    return out


def _records(outputs: list[OutputTensor]) -> list[TensorRecord]:
    return [
        TensorRecord(
            o.plan.name,
            tuple(reversed(o.plan.shape)),
            o.hi.type,
            o.hi.wanted,
            o.lo.type if o.lo else None,
            o.lo.wanted if o.lo else None,
        )
        for o in outputs
    ]


def _sidecar_writer(
    arch: str, meta: dict[str, Any], lo_type: str, n_expert: int, fp: str, main_name: str
) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(None, arch)
    w.add_type("pymoe-sidecar")
    w.add_name(f"{meta.get('general.name') or main_name} (low-precision experts, {lo_type})")
    for key in ("block_count", "expert_count", "expert_used_count", "expert_shared_count"):
        if f"{arch}.{key}" in meta:
            w.add_uint32(f"{arch}.{key}", int(meta[f"{arch}.{key}"]))
    w.add_uint32(sc.KEY_VERSION, sc.SIDECAR_VERSION)
    w.add_string(sc.KEY_FINGERPRINT, fp)
    w.add_string(sc.KEY_MAIN_NAME, main_name)
    w.add_string(sc.KEY_LO_TYPE, lo_type)
    w.add_uint32(sc.KEY_EXPERT_COUNT, n_expert)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w


def check_header_loads(path: Path, label: str) -> None:
    """llama.cpp's loader, dry, on a GGUF whose header is written and whose
    data is not yet (`GGUFStream.reserve`): hyperparameters, vocabulary and
    every tensor's name and shape as llama.cpp checks them. What it would not
    load is refused before a weight is written."""
    try:
        _core.check_loadable(str(path))
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        reason = first.split(" cannot be loaded: ", 1)[-1]  # pymoe's checks
        for line in str(e).splitlines():  # llama.cpp's loader
            if "error loading model: " in line:
                reason = line.split("error loading model: ", 1)[1]
        raise CheckpointError(
            f"'{label}' would convert to a GGUF that llama.cpp cannot load: {reason}; hint: config.json (or the "
            "tokenizer) does not describe the checkpoint's tensors; use the files that came with the weights"
        ) from e


def _sidecar_tensors(outputs: list[OutputTensor]) -> list[tuple[str, tuple[int, ...], str, int]]:
    return [(o.plan.name, o.plan.shape, o.lo.type, o.lo_nbytes) for o in outputs if o.lo is not None]


def convert(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    outtype: str = DEFAULT_OUTTYPE,
    expert_type: str = DEFAULT_EXPERT_TYPE,
    lo_type: str | None = DEFAULT_LO_TYPE,
    sidecar: str | os.PathLike[str] | None = None,
    force: bool = False,
    n_threads: int = 0,
    pre_tokenizer: str | None = None,
    revision: str | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    download_tqdm: Any = None,
) -> ConvertResult:
    """Converts a Hugging Face checkpoint (a folder or a hub repo id) to a
    GGUF at `output`, experts in `expert_type` and the other weights in
    `outtype`; with `lo_type` (default q2_K) also writes the low-precision
    expert sidecar (default path: `output` with `.lo.gguf`).

    Nothing is written unless every tensor maps and every expert is there;
    outputs appear only when complete (an interrupted run leaves none); an
    existing output is replaced only with `force`, an input never."""
    t0 = time.monotonic()
    outtype = qtypes.parse_type(outtype, "--outtype")
    expert_type = qtypes.parse_type(expert_type, "--expert-type")
    lo_type = qtypes.parse_type(lo_type, "--lo-type") if lo_type else None
    output = Path(output)
    side_path = (Path(sidecar) if sidecar else sc.default_sidecar_path(output)) if lo_type else None
    if side_path is not None and side_path.resolve() == output.resolve():
        raise ValueError(f"the sidecar path '{side_path}' is the output path; hint: choose another --sidecar")
    for path in (output, side_path):
        if path is not None:
            check_output_path(path, force=force)  # fail before a download, not after

    folder, label = hub.resolve(source, revision=revision, local_dir=local_dir, tqdm_class=download_tqdm)
    ckpt = Checkpoint(folder, label)
    conv: MoEConverter = converter_class(ckpt.config, label)(ckpt)
    plans = conv.plan()
    vocab = load_vocab(folder, int(conv.hparam("vocab_size")), pre_tokenizer)
    outputs = choose_types(plans, outtype, expert_type, lo_type)

    w = gguf.GGUFWriter(None, conv.arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(label)
    conv.write_hparams(w)
    if (ft := qtypes.file_type(expert_type)) is not None:
        w.add_file_type(ft)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("pymoe.convert.source", label)
    w.add_string("pymoe.convert.outtype", outtype)
    w.add_string("pymoe.convert.expert_type", expert_type)
    vocab.write(w)

    inputs = tuple(ckpt.files)
    placeholder = secrets.token_hex(32)  # the main file's fingerprint is known only once it is written
    with ExitStack() as stack:
        tmp_main = stack.enter_context(atomic_output(output, inputs=inputs, force=force))
        tmp_side = stack.enter_context(atomic_output(side_path, inputs=inputs, force=force)) if side_path else None
        main = GGUFStream(tmp_main, w, [(o.plan.name, o.plan.shape, o.hi.type, o.nbytes) for o in outputs])
        stack.callback(main.release)
        w.add_size_label(gguf.size_label(*w.get_total_parameter_count()))
        main.open()
        main.reserve()
        check_header_loads(tmp_main, label)
        side = None
        if tmp_side is not None and side_path is not None and lo_type is not None:
            meta = {key: v.value for key, v in w.kv_data[0].items()}  # what the main file says
            sw = _sidecar_writer(conv.arch_name, meta, lo_type, conv.n_expert, placeholder, output.name)
            side = GGUFStream(tmp_side, sw, _sidecar_tensors(outputs))
            stack.callback(side.release)
            side.open()
        write_tensors(outputs, main, side, n_threads=n_threads, progress=progress)
        main.close()
        if side is not None and tmp_side is not None:
            side.close()
            patch_header(tmp_side, side.header_end, placeholder, sc.fingerprint(tmp_main))
    return ConvertResult(
        output=output,
        sidecar=side_path,
        tensors=_records(outputs),
        output_bytes=output.stat().st_size,
        sidecar_bytes=side_path.stat().st_size if side_path else 0,
        seconds=time.monotonic() - t0,
        skipped=conv.skipped,
    )


def _gguf_expert_plan(path: Path, t: dict[str, Any]) -> TensorPlan:
    """A plan that dequantises one expert tensor of an existing GGUF, expert by expert."""
    ne = tuple(int(d) for d in t["shape"])  # [n_in, n_out, n_expert]
    n_in, n_expert = ne[0], ne[-1]
    per_expert = int(t["nbytes"]) // n_expert
    row = qtypes.row_bytes(t["type"], n_in)

    def load():
        with open(path, "rb") as f:
            for e in range(n_expert):
                f.seek(int(t["offset"]) + e * per_expert)
                raw = np.frombuffer(f.read(per_expert), dtype=np.uint8)
                yield _core.dequantize(raw.reshape(-1, row), t["type"], n_in)

    return TensorPlan(t["name"], tuple(reversed(ne)), load, f"{path.name}:{t['name']}")


def build_sidecar(
    main: str | os.PathLike[str],
    sidecar: str | os.PathLike[str] | None = None,
    *,
    lo_type: str = DEFAULT_LO_TYPE,
    force: bool = False,
    n_threads: int = 0,
    progress: Progress | None = None,
) -> ConvertResult:
    """The low-precision expert sidecar of an existing GGUF (one we did not
    write, e.g. a downloaded Q4_K_M): its experts dequantised and quantised
    again to `lo_type`. The main file is only read."""
    t0 = time.monotonic()
    main_p = check_gguf_path(main)
    lo_type = qtypes.parse_type(lo_type, "--lo-type")
    side_path = Path(sidecar) if sidecar else sc.default_sidecar_path(main_p)
    header = _core.read_gguf(str(main_p), 0)
    meta = header["metadata"]
    arch = str(meta.get("general.architecture", ""))
    n_expert = int(meta.get(f"{arch}.expert_count", 0) or 0)
    experts = [t for t in header["tensors"] if sc.is_expert_weight(t["name"])]
    if n_expert == 0 or not experts:
        raise ValueError(
            f"'{main_p}' has no routed-expert tensors; hint: a sidecar is only for Mixture-of-Experts models"
        )
    for t in experts:
        info = _core.type_info(t["type"])
        if not info["can_dequantize"]:
            raise ValueError(
                f"'{main_p}': expert tensor '{t['name']}' is {t['type']}, which ggml cannot dequantise here"
            )
    plans = [_gguf_expert_plan(main_p, t) for t in experts]
    outputs = [OutputTensor(p, qtypes.fit_type(lo_type, p.row_length)) for p in plans]
    fp = sc.fingerprint(main_p)
    w = _sidecar_writer(arch, meta, lo_type, n_expert, fp, main_p.name)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(side_path, inputs=(main_p,), force=force))
        stream = GGUFStream(tmp, w, [(o.plan.name, o.plan.shape, o.hi.type, o.nbytes) for o in outputs])
        stack.callback(stream.release)
        stream.open()
        write_tensors(outputs, stream, None, n_threads=n_threads, progress=progress)
        stream.close()
    records = [
        TensorRecord(o.plan.name, tuple(reversed(o.plan.shape)), "", "", o.hi.type, o.hi.wanted) for o in outputs
    ]
    return ConvertResult(
        output=main_p,
        sidecar=side_path,
        tensors=records,
        output_bytes=0,
        sidecar_bytes=side_path.stat().st_size,
        seconds=time.monotonic() - t0,
    )
