"""`pymoe perplexity`: perplexity of a model on a text file, measured the way
llama.cpp's llama-perplexity does (chunks of --chunk tokens, each scored on
its second half), and how far a run is from a reference run: save the
reference's logits once (--kl-divergence-base FILE), then compare any run
with them (--kl-divergence-base FILE --kl-divergence): KL divergence, top-1
agreement and the perplexity ratio, as llama-perplexity's options of the same
names do. This is how to choose --lo-threshold and a sidecar type for a model
(docs/quality.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._atomic import atomic_output, check_output_path
from ._stats_args import add_stats_args, check_stats_args, report_stats
from ._units import format_bytes

if TYPE_CHECKING:
    from .model import Model

Tokens = Sequence[int] | np.ndarray

# ------------------------------------------------------------------ results


@dataclass
class ReferenceComparison:
    """A run against a saved reference run on the same positions. KL is
    KL(reference || run) in nats per position; the errors are standard errors
    of the mean over positions."""

    reference_perplexity: float
    ppl_ratio: float  # perplexity of the run / of the reference (exp of the mean paired nll difference)
    ppl_ratio_stderr: float
    kl_mean: float
    kl_stderr: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float  # share of positions where both runs' most likely token is the same
    top1_stderr: float
    identical: float  # share of positions whose logits are bit-identical to the reference's

    @property
    def ppl_change_pct(self) -> float:
        return 100.0 * (self.ppl_ratio - 1.0)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    nll_stderr: float
    n_tokens: int  # scored positions
    n_chunks: int  # chunks evaluated
    n_ctx: int
    chunks: list[int] = field(default_factory=list)  # which chunks of the text (index of each)
    token_by_token: bool = False
    comparison: ReferenceComparison | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ the reference file

MAGIC = b"PYMOEKLD"
VERSION = 1
LP_RANGE = 32.0  # nats below a row's largest log-probability that are kept; lower ones count as probability 0
BELOW = 65535  # the code of a log-probability below that range
_ALIGN = 64


def _sections(n_chunks: int, n_ctx: int, n_rows: int, n_vocab: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The arrays of a reference file, in file order: name -> (dtype, shape)."""
    return {
        "tokens": ("<i4", (n_chunks, n_ctx)),  # the text's tokens of each evaluated chunk (BOS not substituted)
        "nll": ("<f8", (n_rows,)),  # the reference's negative log-likelihood of each scored token
        "argmax": ("<i4", (n_rows,)),  # its most likely token at each position
        "digest": ("u1", (n_rows, 8)),  # blake2b-64 of the position's float32 logits
        "top": ("<f4", (n_rows,)),  # the largest log-probability of the position
        "step": ("<f4", (n_rows,)),  # nats per code
        "codes": ("<u2", (n_rows, n_vocab)),  # (top - log-probability) / step, rounded; BELOW: out of range
    }


def _layout(header: dict[str, Any]) -> tuple[dict[str, tuple[int, np.dtype, tuple[int, ...]]], int]:
    n_rows = len(header["chunks"]) * (header["n_ctx"] - header["first"])
    offset = header["data_offset"]
    out = {}
    for name, (dtype, shape) in _sections(len(header["chunks"]), header["n_ctx"], n_rows, header["n_vocab"]).items():
        dt = np.dtype(dtype)
        out[name] = (offset, dt, shape)
        offset += -(-int(np.prod(shape)) * dt.itemsize // _ALIGN) * _ALIGN
    return out, offset


def _digest(row: np.ndarray) -> np.ndarray:
    return np.frombuffer(
        hashlib.blake2b(np.ascontiguousarray(row, dtype="<f4").tobytes(), digest_size=8).digest(), "u1"
    )


@dataclass
class LogitsReference:
    """A saved reference run (`perplexity(..., save_reference=PATH)`), read
    lazily from its file. The format is in docs/quality.md."""

    path: Path
    n_vocab: int
    n_ctx: int
    first: int  # the first scored position of a chunk
    chunks: list[int]
    bos: int | None  # the token put in place of each chunk's first one, as the reference model did
    token_by_token: bool
    model: str
    arrays: dict[str, np.ndarray]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LogitsReference:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"reference file '{p}' does not exist")
        hint = "hint: make it with `pymoe perplexity MODEL -f TEXT --kl-divergence-base FILE`"
        with open(p, "rb") as f:
            head = f.read(len(MAGIC) + 4)
            if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
                raise ValueError(f"'{p}' is not a pymoe logits reference; {hint}")
            (n,) = struct.unpack("<I", head[len(MAGIC) :])
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError(f"'{p}' has a damaged header; {hint}") from None
        if not isinstance(header, dict) or header.get("version") != VERSION:
            version = header.get("version") if isinstance(header, dict) else None
            raise ValueError(f"'{p}' is a version {version} reference, this pymoe reads {VERSION}; {hint}")
        try:
            layout, end = _layout(header)
            if not 1 <= header["first"] < header["n_ctx"] or header["data_offset"] < len(MAGIC) + 4 + n:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"'{p}' has a damaged header; {hint}") from None
        size = p.stat().st_size
        if size < end:
            raise ValueError(f"'{p}' is truncated ({size} of {end} bytes); {hint}")
        arrays = {
            name: np.memmap(p, dtype=dt, mode="r", offset=offset, shape=shape)
            for name, (offset, dt, shape) in layout.items()
        }
        return cls(
            path=p,
            n_vocab=int(header["n_vocab"]),
            n_ctx=int(header["n_ctx"]),
            first=int(header["first"]),
            chunks=[int(c) for c in header["chunks"]],
            bos=header["bos"],
            token_by_token=bool(header["token_by_token"]),
            model=str(header.get("model", "")),
            arrays=arrays,
        )

    @property
    def n_rows(self) -> int:
        return len(self.chunks) * (self.n_ctx - self.first)

    def log_probs(self, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities [n, n_vocab] (float64, -inf where out of range,
        renormalised over the kept tokens) of the reference at those rows."""
        codes = np.asarray(self.arrays["codes"][rows])
        top = self.arrays["top"][rows].astype(np.float64)[:, None]
        step = self.arrays["step"][rows].astype(np.float64)[:, None]
        lp = np.where(codes == BELOW, -np.inf, top - codes * step)
        m = lp.max(axis=1, keepdims=True)
        lp -= m + np.log(np.exp(lp - m).sum(axis=1, keepdims=True))
        return lp, codes != BELOW


class _ReferenceWriter:
    """Writes a reference file: the header and tokens first, each chunk's rows as they come."""

    def __init__(self, tmp: Path, header: dict[str, Any], tokens: np.ndarray) -> None:
        body = json.dumps(header).encode("utf-8")
        header["data_offset"] = -(-(len(MAGIC) + 4 + len(body) + 64) // _ALIGN) * _ALIGN
        body = json.dumps(header).encode("utf-8")  # now with its offset; the padding keeps it in front of the data
        layout, end = _layout(header)
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(body)) + body)
            f.truncate(end)
        self.arrays = {
            name: np.memmap(tmp, dtype=dt, mode="r+", offset=offset, shape=shape)
            for name, (offset, dt, shape) in layout.items()
        }
        self.arrays["tokens"][:] = tokens

    def write(self, row: int, rows: np.ndarray, lp: np.ndarray, nll: np.ndarray) -> None:
        """Rows `row` .. `row + len(rows)` of the file: logits, their log-probabilities and nll."""
        at = slice(row, row + len(rows))
        a = self.arrays
        top = lp.max(axis=1)
        floor = np.maximum(lp.min(axis=1), top - LP_RANGE)
        step = np.where(top > floor, (top - floor) / (BELOW - 1), 1.0).astype(np.float32).astype(np.float64)
        codes = np.rint((top[:, None] - lp) / step[:, None])
        a["codes"][at] = np.where(lp < floor[:, None], BELOW, np.minimum(codes, BELOW - 1)).astype("<u2")
        a["top"][at] = top
        a["step"][at] = step
        a["nll"][at] = nll
        a["argmax"][at] = rows.argmax(axis=1)
        a["digest"][at] = np.stack([_digest(r) for r in rows])

    def close(self) -> None:
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()


# ------------------------------------------------------------------ evaluation


def pick_chunks(n_total: int, n_chunks: int) -> list[int]:
    """`n_chunks` chunk indices spread evenly over `n_total` (the first and the
    last included); every chunk for 0 or for at least `n_total`."""
    if n_chunks <= 0 or n_chunks >= n_total:
        return list(range(n_total))
    return sorted({int(i) for i in np.linspace(0, n_total - 1, n_chunks).round()})


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    x = rows.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def _chunk_rows(model: Model, fed: np.ndarray, first: int, token_by_token: bool) -> np.ndarray:
    """float32 logits of the positions before the scored tokens (rows first-1 .. n_ctx-2)."""
    n_ctx = len(fed)
    if not token_by_token:
        return model.logits(fed)[first - 1 : n_ctx - 1]
    # every token its own step from an empty cache (each call reuses the cached prefix)
    model.reset()
    seq = fed.tolist()
    rows = [model.next_token_logits(seq[:i]) for i in range(1, n_ctx)]
    return np.stack(rows[first - 1 :])


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


_BLOCK = 32  # rows scored at a time: [32, n_vocab] float64 arrays, not [n_ctx / 2, n_vocab]


@dataclass
class _Scores:
    nll: list[np.ndarray] = field(default_factory=list)
    argmax: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    identical: list[np.ndarray] = field(default_factory=list)

    def add(self, rows: np.ndarray, targets: np.ndarray, ref: LogitsReference | None, at: int) -> np.ndarray:
        """Scores rows whose reference rows start at `at`; returns their log-probabilities."""
        lp = _log_softmax(rows)
        self.nll.append(-lp[np.arange(len(targets)), targets])
        self.argmax.append(rows.argmax(axis=1))
        if ref is not None:
            ref_lp, kept = ref.log_probs(slice(at, at + len(rows)))
            diff = np.where(kept, ref_lp - np.where(kept, lp, 0.0), 0.0)  # out-of-range tokens: probability 0
            kl = (np.exp(ref_lp) * diff).sum(axis=1)
            digests = ref.arrays["digest"][at : at + len(rows)]
            same = np.array([(_digest(r) == d).all() for r, d in zip(rows, digests, strict=True)])
            self.kl.append(np.where(same, 0.0, kl))  # the same logits: the same distribution, exactly
            self.identical.append(same)
        return lp


def _evaluate(
    model: Model,
    chunk_tokens: np.ndarray,
    first: int,
    bos: int | None,
    token_by_token: bool,
    ref: LogitsReference | None,
    writer: _ReferenceWriter | None,
) -> _Scores:
    scores = _Scores()
    n_scored = chunk_tokens.shape[1] - first
    for i, chunk in enumerate(chunk_tokens):
        fed = chunk.copy()
        if bos is not None:
            fed[0] = bos
        rows = _chunk_rows(model, fed, first, token_by_token)
        targets = chunk[first:].astype(np.int64)
        for b in range(0, n_scored, _BLOCK):
            block = slice(b, b + _BLOCK)
            lp = scores.add(rows[block], targets[block], ref, i * n_scored + b)
            if writer is not None:
                writer.write(i * n_scored + b, rows[block], lp, scores.nll[-1])
    return scores


def perplexity(
    model: Model,
    tokens: Tokens | None = None,
    *,
    n_ctx: int | None = None,
    chunks: int = 0,
    token_by_token: bool | None = None,
    reference: str | os.PathLike[str] | LogitsReference | None = None,
    save_reference: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> PerplexityResult:
    """Perplexity the way llama.cpp's `llama-perplexity` measures it: `tokens`
    are cut into chunks of `n_ctx` (default min(model.n_ctx, 512)); each chunk
    is evaluated from an empty cache, BOS in place of its first token when the
    model adds one, and the second half of its positions is scored.

    `chunks` > 0 evaluates that many chunks spread evenly over the text.
    `token_by_token` feeds each chunk one token per step, as decoding does,
    instead of in one batch (the engine decides mixed precision per step);
    None: as the reference was made, else in one batch.
    `save_reference` writes this run's log-probabilities to a file (refused
    over an existing one unless `force`); `reference` compares this run with
    such a file, on the file's tokens and chunks (`tokens` is then not given):
    the result's `comparison` holds KL divergence, top-1 agreement and the
    perplexity ratio."""
    if reference is not None and not isinstance(reference, LogitsReference):
        reference = LogitsReference.open(reference)
    ref = reference
    bos_ids = model.tokenize("", add_bos=True)
    bos = int(bos_ids[0]) if bos_ids else None
    if ref is not None:
        if tokens is not None:
            raise ValueError("a comparison runs on the reference's own tokens; hint: pass no tokens with a reference")
        if n_ctx is not None and n_ctx != ref.n_ctx:
            raise ValueError(f"the reference was made with chunks of {ref.n_ctx} tokens, not {n_ctx}")
        if ref.n_vocab != model.n_vocab or ref.bos != bos:
            raise ValueError(
                f"the reference '{ref.path}' comes from a model with another vocabulary ({ref.n_vocab} tokens, "
                f"chunks start with {ref.bos}; this one: {model.n_vocab}, {bos}); hint: compare models that share "
                "a tokenizer"
            )
        ctx, first, picks = ref.n_ctx, ref.first, ref.chunks
        chunk_tokens = np.asarray(ref.arrays["tokens"])
        token_by_token = ref.token_by_token if token_by_token is None else token_by_token
    else:
        if tokens is None:
            raise ValueError("perplexity needs tokens (or a reference to compare with)")
        ctx = int(n_ctx or min(model.n_ctx, 512))
        arr = np.asarray(tokens, dtype=np.int64)
        n_total = len(arr) // ctx
        if n_total == 0:
            raise ValueError(f"need at least {ctx} tokens for one chunk of perplexity, got {len(arr)}")
        first = ctx // 2
        picks = pick_chunks(n_total, chunks)
        token_by_token = bool(token_by_token)
        chunk_tokens = np.stack([arr[c * ctx : (c + 1) * ctx] for c in picks]).astype(np.int32)
    if not 2 <= ctx <= model.n_ctx:
        raise ValueError(f"n_ctx for perplexity must be in [2, {model.n_ctx}]")
    if save_reference is None:
        scores = _evaluate(model, chunk_tokens, first, bos, token_by_token, ref, None)
    else:
        header = {
            "format": "pymoe logits reference",
            "version": VERSION,
            "n_vocab": model.n_vocab,
            "n_ctx": ctx,
            "first": first,
            "chunks": picks,
            "bos": bos,
            "token_by_token": token_by_token,
            "lp_range": LP_RANGE,
            "model": model.path.name,
        }
        with atomic_output(save_reference, force=force) as tmp:
            writer = _ReferenceWriter(tmp, header, chunk_tokens)
            try:
                scores = _evaluate(model, chunk_tokens, first, bos, token_by_token, ref, writer)
            finally:
                writer.close()
    nll = np.concatenate(scores.nll)
    mean, err = _mean_stderr(nll)
    result = PerplexityResult(
        perplexity=float(np.exp(mean)),
        nll=mean,
        nll_stderr=err,
        n_tokens=len(nll),
        n_chunks=len(picks),
        n_ctx=ctx,
        chunks=list(picks),
        token_by_token=token_by_token,
    )
    if ref is not None:
        result.comparison = _compare(
            nll, np.concatenate(scores.argmax), np.concatenate(scores.kl), np.concatenate(scores.identical), ref
        )
    return result


def _compare(
    nll: np.ndarray, argmax: np.ndarray, kl: np.ndarray, same: np.ndarray, ref: LogitsReference
) -> ReferenceComparison:
    ref_nll = np.asarray(ref.arrays["nll"], dtype=np.float64)
    d = nll - ref_nll
    d_mean, d_err = _mean_stderr(d)
    ratio = float(np.exp(d_mean))
    kl_mean, kl_err = _mean_stderr(kl)
    agree = argmax == np.asarray(ref.arrays["argmax"])
    a = float(agree.mean())
    return ReferenceComparison(
        reference_perplexity=float(np.exp(ref_nll.mean())),
        ppl_ratio=ratio,
        ppl_ratio_stderr=ratio * d_err,
        kl_mean=kl_mean,
        kl_stderr=kl_err,
        kl_median=float(np.median(kl)),
        kl_p99=float(np.quantile(kl, 0.99)),
        kl_max=float(kl.max()),
        top1_agreement=a,
        top1_stderr=float(np.sqrt(a * (1.0 - a) / len(agree))),
        identical=float(same.mean()),
    )


# ------------------------------------------------------------------ command line


def setup_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from ._args import add_model_args

    parser = parser or argparse.ArgumentParser(prog="pymoe perplexity")
    parser.description = __doc__
    add_model_args(parser)
    parser.add_argument("-f", "--file", metavar="FILE", help="a UTF-8 text file (not with --kl-divergence)")
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        metavar="N",
        help="tokens per chunk (default: 512; with --kl-divergence: the reference's)",
    )
    parser.add_argument(
        "--chunks",
        type=int,
        default=0,
        metavar="N",
        help="evaluate N chunks spread evenly over the text, the first and the last included (default: all)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--token-by-token",
        dest="token_by_token",
        action="store_const",
        const=True,
        help="feed each chunk one token per step, as decoding does, not in one batch: mixed precision decides "
        "per step, so this is the setting to choose --lo-threshold in (slower; with --kl-divergence the default "
        "is the reference's)",
    )
    mode.add_argument(
        "--batched",
        dest="token_by_token",
        action="store_const",
        const=False,
        help="each chunk in one batch (the default without a reference)",
    )
    parser.add_argument(
        "--kl-divergence-base",
        metavar="FILE",
        help="save this run's log-probabilities here (a reference), or with --kl-divergence compare with them",
    )
    parser.add_argument(
        "--kl-divergence",
        action="store_true",
        help="compare this run with the reference of --kl-divergence-base: KL divergence, top-1 agreement, "
        "perplexity ratio",
    )
    parser.add_argument("--force", action="store_true", help="overwrite the --kl-divergence-base file if it exists")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_stats_args(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    from ._args import load_model

    check_stats_args(args)
    tokens_from_text = not args.kl_divergence
    if args.kl_divergence:
        if not args.kl_divergence_base:
            raise ValueError("--kl-divergence compares with a reference; hint: give it with --kl-divergence-base FILE")
        if args.file:
            raise ValueError("--kl-divergence runs on the reference's own tokens; hint: drop -f")
        ref = LogitsReference.open(args.kl_divergence_base)
        chunk = ref.n_ctx
        if args.chunk is not None and args.chunk != chunk:
            raise ValueError(f"the reference was made with --chunk {chunk}; hint: drop --chunk")
    else:
        if not args.file:
            raise ValueError("perplexity needs a text; hint: pass -f FILE")
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"text file '{path}' does not exist")
        chunk = 512 if args.chunk is None else args.chunk
        if chunk < 2:
            raise ValueError("--chunk must be >= 2")
        if args.kl_divergence_base:
            check_output_path(Path(args.kl_divergence_base), force=args.force)
    with load_model(args, n_ctx=max(args.n_ctx, chunk)) as model:
        if tokens_from_text:
            tokens = model.tokenize(path.read_text(encoding="utf-8"), add_bos=False)
            res = model.perplexity(
                tokens,
                n_ctx=chunk,
                chunks=args.chunks,
                token_by_token=args.token_by_token,
                save_reference=args.kl_divergence_base,
                force=args.force,
            )
        else:
            res = model.perplexity(reference=ref, token_by_token=args.token_by_token)
        report_stats(args, model)
    if args.json:
        print(json.dumps(res.as_dict()))
        return 0
    print(
        f"perplexity {res.perplexity:.4f} (nll {res.nll:.4f} +/- {res.nll_stderr:.4f}) "
        f"over {res.n_tokens} scored tokens in {res.n_chunks} chunks of {res.n_ctx}"
        + (", token by token" if res.token_by_token else "")
    )
    c = res.comparison
    if c is not None:
        print(
            f"reference perplexity {c.reference_perplexity:.4f}; ratio {c.ppl_ratio:.4f} +/- {c.ppl_ratio_stderr:.4f} "
            f"({c.ppl_change_pct:+.2f}%)"
        )
        print(
            f"KL divergence mean {c.kl_mean:.5f} +/- {c.kl_stderr:.5f}, median {c.kl_median:.5f}, "
            f"p99 {c.kl_p99:.4f}, max {c.kl_max:.4f}"
        )
        print(
            f"top-1 agreement {c.top1_agreement:.2%} +/- {c.top1_stderr:.2%}; "
            f"bit-identical logits at {c.identical:.2%} of the positions"
        )
    elif args.kl_divergence_base:
        size = Path(args.kl_divergence_base).stat().st_size
        print(f"saved the reference ({res.n_tokens} positions, {format_bytes(size)}) to {args.kl_divergence_base}")
    return 0
