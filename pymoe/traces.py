"""Expert-routing traces recorded from real MoE models.

Two formats are read (see shared/traces/README.md for the files):

- one JSON object per (token, layer) with ``experts`` and ``gating_probs``
  (Mixtral-8x7B in vLLM: ``problem_id``, ``layer``, ``token_idx`` or
  ``token_pos``);
- vLLM router logs: a ``meta`` line, then ``route`` lines with ``req_id``,
  ``token_idx`` (the row inside one forward pass), ``layer``, ``topk_ids``,
  ``topk_weights``; one file per logged layer (Qwen1.5-MoE, OLMoE). Their
  first rows may be the server's warm-up on dummy data (``skip_rows``).

A trace becomes arrays ``experts`` / ``weights`` of shape
``[n_tokens, n_layer, k]`` with the tokens of each sequence (a problem, a
request) consecutive and in order.
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


@dataclass
class Trace:
    name: str
    experts: np.ndarray  # int32 [n_tokens, n_layer, k]
    weights: np.ndarray  # float32 [n_tokens, n_layer, k]
    n_expert: int  # experts per layer of the traced model (at least max id + 1)
    layers: list[int]  # the traced model's layer number of each column
    sequences: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token rows per sequence

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
        return np.ascontiguousarray(self.experts[:, cols, :]), np.ascontiguousarray(self.weights[:, cols, :])


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


def load_trace(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, skip_rows: int | None = None
) -> Trace:
    """Reads a trace: one Mixtral-style file, or one or more vLLM route logs
    (several layers of one run). `skip_rows` drops leading route rows per file
    (default: the Qwen1.5 warm-up for files named qwen1.5*, else 0)."""
    plist = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for p in plist:
        if not p.is_file():
            raise FileNotFoundError(f"trace file '{p}' does not exist")
    with open(plist[0]) as f:
        first = json.loads(f.readline())
    if first.get("type") == "meta":
        if skip_rows is None:
            skip_rows = QWEN_WARMUP_ROWS if plist[0].name.startswith("qwen1.5") else 0
        return _load_vllm_routes(plist, skip_rows)
    if len(plist) != 1:
        raise ValueError("per-token traces come in one file")
    return _load_per_token_layer(plist[0])
