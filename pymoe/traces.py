"""Expert-routing traces: recorded from real MoE models by pymoe itself
(``--record-routing FILE``), or by other people (shared/traces/README.md).

Three formats are read:

- pymoe's own routing record (``--record-routing``, native/pymoe-recorder.*):
  one JSON line, then binary records, one per step of a MoE layer. The JSON
  line: ``{"format": "pymoe-routing", "version": 1, "byte_order": "little",
  "model": NAME, "n_layer": N, "n_expert": E, "n_expert_used": K,
  "prefetch_depth": D, "expert_bytes": B, "expert_params": P}`` (D = 0:
  prefetching was off; B and P: one expert of the first MoE layer, all its
  projections, in bytes and in parameters). Each record, in that
  byte order: ``int32 layer, int32 n_tokens, int32 n_used``, ``int32
  experts[n_tokens * n_used]`` and ``float32 weights[n_tokens * n_used]`` (the
  router's choice and gate weights, token-major), ``int32 n_guesses``,
  ``int32 guesses[n_guesses][2]`` (target layer, expert): the experts the
  prefetcher had predicted for the later layers' next steps once this step
  was planned. Records come in graph order: the MoE layers of one ubatch,
  ascending, then the next ubatch. A record cut short (a killed run) ends the
  trace, as does a ubatch that lacks some layer.
- one JSON object per (token, layer) with ``experts`` and ``gating_probs``
  (Mixtral-8x7B in vLLM: ``problem_id``, ``layer``, ``token_idx`` or
  ``token_pos``);
- vLLM router logs: a ``meta`` line, then ``route`` lines with ``req_id``,
  ``token_idx`` (the row inside one forward pass), ``layer``, ``topk_ids``,
  ``topk_weights``; one file per logged layer (Qwen1.5-MoE, OLMoE). Their
  first rows may be the server's warm-up on dummy data (``skip_rows``).

A trace becomes arrays ``experts`` / ``weights`` of shape
``[n_tokens, n_layer, k]`` with the tokens of each sequence (a problem, a
request) consecutive and in order; a recorded run also keeps the ubatches
its tokens were evaluated in and the predictor's guesses, and marks with -1
the rows of tokens that skipped a layer (llama.cpp computes only the output
rows of the last layer).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# rows of server warm-up at the start of the Qwen1.5-MoE logs (shared/traces/README.md)
QWEN_WARMUP_ROWS = 8448
# and of the OLMoE log: its first 2048 rows route every token to experts 7, 6, 4, 5, 1, 0, 2, 3
# with equal weights 0.125 (dummy data); real tokens follow
OLMOE_WARMUP_ROWS = 2048
ROUTING_FORMAT = "pymoe-routing"


@dataclass
class Trace:
    name: str
    experts: np.ndarray  # int32 [n_tokens, n_layer, k]
    weights: np.ndarray  # float32 [n_tokens, n_layer, k]
    n_expert: int  # experts per layer of the traced model (at least max id + 1)
    layers: list[int]  # the traced model's layer number of each column
    sequences: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token rows per sequence
    # a recorded run: tokens per ubatch, in order (None: one token each), and the
    # predictor's guesses int32 [n, 4] (token row of the ubatch, layer column, target layer column, expert)
    ubatches: list[int] | None = None
    guesses: np.ndarray | None = None
    # a recorded run: the model's file name, one expert's bytes and parameters (the first MoE layer's)
    model: str | None = None
    expert_bytes: int | None = None
    expert_params: int | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def k(self) -> int:
        return int(self.experts.shape[2])

    def fit(self, n_layer: int, n_expert: int, k: int) -> np.ndarray:
        """Expert ids [n_tokens, n_layer, k] for a model of that shape.

        Layers map to the traced layer at the same relative depth (a traced
        model with fewer logged layers repeats them); the expert count and k
        must match the trace: a model with another routing shape would see an
        access pattern that no real model produced."""
        return self.fit_routes(n_layer, n_expert, k)[0]

    def fit_routes(self, n_layer: int, n_expert: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Expert ids and their gate weights, both [n_tokens, n_layer, k], mapped as `fit` maps them."""
        if n_expert != self.n_expert or k != self.k:
            raise ValueError(
                f"trace {self.name} routes top-{self.k} of {self.n_expert} experts; the model top-{k} of {n_expert}. "
                "hint: replay it on a model of the same routing shape"
            )
        cols = [min(len(self.layers) - 1, (il * len(self.layers)) // n_layer) for il in range(n_layer)]
        rows = (self.experts >= 0).all(axis=(1, 2))  # tokens that passed every layer
        return (
            np.ascontiguousarray(self.experts[rows][:, cols, :]),
            np.ascontiguousarray(self.weights[rows][:, cols, :]),
        )


def _load_per_token_layer(path: Path) -> Trace:
    # the n-th row of a layer within a problem is that problem's n-th token (file order); a
    # token is kept when every layer logged it
    rows: dict[tuple[int, int], dict[int, tuple[list[int], list[float]]]] = defaultdict(dict)
    seen: dict[tuple[int, int], int] = defaultdict(int)
    layers: set[int] = set()
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            problem, layer = int(r.get("problem_id", 0)), int(r["layer"])
            n = seen[(problem, layer)]
            seen[(problem, layer)] += 1
            rows[(problem, n)][layer] = (r["experts"], r["gating_probs"])
            layers.add(layer)
    layer_list = sorted(layers)
    keys = sorted(k for k, v in rows.items() if len(v) == len(layer_list))
    if not keys:
        raise ValueError(f"'{path}' has no token logged at every layer")
    k = len(rows[keys[0]][layer_list[0]][0])
    experts = np.zeros((len(keys), len(layer_list), k), np.int32)
    weights = np.zeros((len(keys), len(layer_list), k), np.float32)
    sequences, start = [], 0
    for i, key in enumerate(keys):
        if i and key[0] != keys[i - 1][0]:
            sequences.append((start, i))
            start = i
        for j, il in enumerate(layer_list):
            experts[i, j], weights[i, j] = rows[key][il]
    sequences.append((start, len(keys)))
    return Trace(path.stem, experts, weights, int(experts.max()) + 1, layer_list, sequences)


def _load_vllm_routes(paths: Sequence[Path], skip_rows: int) -> Trace:
    per_layer: dict[int, list[tuple[str, list[int], list[float]]]] = {}
    n_expert = 0
    for path in paths:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        meta = next((r for r in lines if r.get("type") == "meta"), {})
        n_expert = max(n_expert, int(meta.get("num_experts", 0)))
        routes = [r for r in lines if r.get("type") == "route"][skip_rows:]
        for r in routes:
            per_layer.setdefault(int(r["layer"]), []).append((str(r["req_id"]), r["topk_ids"], r["topk_weights"]))
    layer_list = sorted(per_layer)
    lengths = {len(v) for v in per_layer.values()}
    if len(lengths) != 1:
        raise ValueError("the per-layer route logs have different row counts; hint: use files of one run")
    # rows of the same request, in order, are its tokens (prefill rows, then one per decode step)
    order: dict[str, list[int]] = defaultdict(list)
    for i, (req, _, _) in enumerate(per_layer[layer_list[0]]):
        order[req].append(i)
    index = [i for req in order for i in order[req]]
    k = len(per_layer[layer_list[0]][0][1])
    experts = np.zeros((len(index), len(layer_list), k), np.int32)
    weights = np.zeros((len(index), len(layer_list), k), np.float32)
    for j, il in enumerate(layer_list):
        rows = per_layer[il]
        experts[:, j] = [rows[i][1] for i in index]
        weights[:, j] = [rows[i][2] for i in index]
    sequences, pos = [], 0
    for req in order:
        sequences.append((pos, pos + len(order[req])))
        pos += len(order[req])
    stems = [p.stem for p in paths]
    name = stems[0]
    while name and not all(st.startswith(name) for st in stems):
        name = name[:-1]
    name = name.rstrip("_") or stems[0]
    return Trace(name, experts, weights, max(n_expert, int(experts.max()) + 1), layer_list, sequences)


def _load_routing_record(path: Path) -> Trace:
    data = path.read_bytes()
    end = data.index(b"\n")
    head = json.loads(data[:end])
    if head.get("version") != 1:
        raise ValueError(
            f"'{path}' is a routing record of version {head.get('version')}; this pymoe reads version 1. "
            "hint: record it again with this pymoe"
        )
    order = "<" if head.get("byte_order", "little") == "little" else ">"
    i32, f32 = np.dtype(order + "i4"), np.dtype(order + "f4")
    body = memoryview(data)[end + 1 :]
    # records: (layer, n_tokens, experts [n_tokens, k], weights, guesses [n, 2])
    records: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = []
    pos, size = 0, len(body)
    while pos + 12 <= size:
        il, n_tokens, n_used = (int(x) for x in np.frombuffer(body, i32, 3, pos))
        n = n_tokens * n_used
        if n_tokens <= 0 or n_used <= 0 or pos + 16 + 8 * n > size:
            break
        experts = np.frombuffer(body, i32, n, pos + 12).reshape(n_tokens, n_used)
        weights = np.frombuffer(body, f32, n, pos + 12 + 4 * n).reshape(n_tokens, n_used)
        pos += 12 + 8 * n
        n_guess = int(np.frombuffer(body, i32, 1, pos)[0])
        if n_guess < 0 or pos + 4 + 8 * n_guess > size:
            break
        guesses = np.frombuffer(body, i32, 2 * n_guess, pos + 4).reshape(n_guess, 2)
        pos += 4 + 8 * n_guess
        records.append((il, n_tokens, experts, weights, guesses))
    if not records:
        raise ValueError(f"'{path}' holds no routing step; hint: record a run that decodes at least one token")
    # ubatches: runs of records with ascending layers
    batches: list[list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]] = [[]]
    for r in records:
        if batches[-1] and r[0] <= batches[-1][-1][0]:
            batches.append([])
        batches[-1].append(r)
    layers = sorted({r[0] for r in records})
    col = {il: j for j, il in enumerate(layers)}
    k = records[0][2].shape[1]
    if any([r[0] for r in b] != layers for b in batches[:-1]):
        raise ValueError(f"'{path}': a ubatch lacks some MoE layers; hint: the record is damaged, record it again")
    if [r[0] for r in batches[-1]] != layers:
        batches.pop()  # the run ended inside a ubatch
    if not batches:
        raise ValueError(f"'{path}' holds no complete ubatch; hint: record a run that decodes at least one token")
    if any(r[2].shape[1] != k for b in batches for r in b):
        raise ValueError(f"'{path}': the steps differ in their experts per token; hint: record it again")
    # a ubatch's tokens: its first layer's; the last layer computes only the rows whose
    # output is wanted (the last ones when generating): the other rows stay -1 there
    sizes = [max(r[1] for r in b) for b in batches]
    n_tokens = sum(sizes)
    experts = np.full((n_tokens, len(layers), k), -1, np.int32)
    weights = np.zeros((n_tokens, len(layers), k), np.float32)
    guesses: list[tuple[int, int, int, int]] = []
    t0 = 0
    for b, n in zip(batches, sizes, strict=True):
        for il, nt, e, w, g in b:
            experts[t0 + n - nt : t0 + n, col[il]] = e
            weights[t0 + n - nt : t0 + n, col[il]] = w
            guesses += [(t0, col[il], col[int(tl)], int(x)) for tl, x in g if int(tl) in col and int(tl) > il]
        t0 += n
    n_expert = max(int(head.get("n_expert", 0)), int(experts.max()) + 1)
    return Trace(
        path.stem,
        experts,
        weights,
        n_expert,
        layers,
        [(0, n_tokens)],
        ubatches=sizes,
        guesses=np.array(guesses, np.int32).reshape(-1, 4),
        model=str(head.get("model") or "") or None,
        expert_bytes=int(head.get("expert_bytes", 0)) or None,
        expert_params=int(head.get("expert_params", 0)) or None,
    )


def load_trace(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, skip_rows: int | None = None
) -> Trace:
    """Reads a trace: a routing record of pymoe's (``--record-routing``), one
    Mixtral-style file, or one or more vLLM route logs (several layers of one
    run). `skip_rows` drops leading route rows per file (default: the server's
    warm-up for files named qwen1.5* or olmoe*, else 0)."""
    plist = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for p in plist:
        if not p.is_file():
            raise FileNotFoundError(f"trace file '{p}' does not exist")
    with open(plist[0], "rb") as fb:
        line = fb.readline()
    try:
        first = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        first = None
    if not isinstance(first, dict):
        raise ValueError(
            f"'{plist[0]}' is not a routing trace (its first line is no JSON object); "
            "hint: record one with --record-routing FILE"
        )
    if first.get("format") == ROUTING_FORMAT:
        if len(plist) != 1:
            raise ValueError("a routing record comes in one file; hint: simulate one recording at a time")
        return _load_routing_record(plist[0])
    if first.get("type") == "meta":
        if skip_rows is None:
            name = plist[0].name
            skip_rows = (
                QWEN_WARMUP_ROWS if name.startswith("qwen1.5") else OLMOE_WARMUP_ROWS if name.startswith("olmoe") else 0
            )
        return _load_vllm_routes(plist, skip_rows)
    if len(plist) != 1:
        raise ValueError("per-token traces come in one file")
    return _load_per_token_layer(plist[0])
