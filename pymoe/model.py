"""`pymoe.Model`: load a GGUF model and generate, chat, score.

The library never prints and never parses argv; the CLI modules do that.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import random
import threading
import time
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from ._interrupt import interruptible
from .chat_template import ChatPrompt, render_chat, tokenize_chat
from .gguf_info import GGUFSummary, check_gguf_path, summarize
from .offload import summarize_stats
from .perplexity import perplexity as _perplexity
from .settings import Settings

Message = dict[str, str]
Tokens = Sequence[int] | np.ndarray  # token ids: a list or a 1-D integer array


@dataclass
class SamplingParams:
    """llama.cpp's sampler chain settings; ``temperature <= 0`` is greedy (deterministic)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def make(self, n_vocab: int) -> _core.Sampler:
        seed = self.seed if self.seed is not None else random.randrange(0, 2**32 - 1)
        return _core.Sampler(
            n_vocab,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            repeat_last_n=self.repeat_last_n,
            seed=seed,
        )


@dataclass
class GenerationStats:
    """Counts and timings of the last generate/chat call."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (end of generation or a stop string), "length", "interrupted"

    @property
    def prompt_tokens_per_second(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generate_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_seconds": self.prompt_seconds,
            "generate_seconds": self.generate_seconds,
            "prompt_tokens_per_second": self.prompt_tokens_per_second,
            "generate_tokens_per_second": self.generate_tokens_per_second,
            "finish_reason": self.finish_reason,
        }


@dataclass
class _Totals:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    calls: int = 0
    last: GenerationStats = field(default_factory=GenerationStats)


class Model:
    """A GGUF model loaded by llama.cpp.

    >>> with Model("model.gguf", n_ctx=4096, expert_budget="6GiB") as m:
    ...     print(m.generate("The capital of France is", max_tokens=8, temperature=0))

    `settings` (a `pymoe.Settings`) says how the model is loaded and how its
    experts are served; keyword arguments change single settings
    (``Model(path, settings, n_ctx=512)``). `Settings` documents each one:
    context and batch sizes, threads, GPU layers, the KV cache type, and the
    expert-offload engine (on/off, budget, policy, tier, sidecar, prefetching).
    """

    def __init__(self, path: str | os.PathLike[str], settings: Settings | None = None, /, **changes: Any) -> None:
        self.path = Path(path)
        self.settings = (settings or Settings()).replace(**changes)
        check_gguf_path(self.path)
        _core.set_log_level(2 if self.settings.verbose else 100)
        self._summary: GGUFSummary = summarize(self.path)
        params, self.offload, self.sidecar = self.settings.resolve(self.path, self._summary)
        self._native = _core.Model(params)
        self._lock = threading.RLock()
        self._past: list[int] = []  # tokens whose KV cache sequence 0 holds, in order
        self._totals = _Totals()
        self._tokens_evaluated = 0  # tokens run through the model since load (or reset_stats)
        self._control: dict[int, bool] = {}  # token id -> is a control token

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Frees the model and its context; later calls raise ValueError."""
        with self._lock:
            self._native.close()
            self._past = []

    @property
    def closed(self) -> bool:
        return bool(self._native.closed)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self.n_ctx}"
        return f"Model({str(self.path)!r}, {state})"

    # ------------------------------------------------------------------ properties

    @property
    def n_ctx(self) -> int:
        return int(self._native.n_ctx)

    @property
    def n_vocab(self) -> int:
        return int(self._native.n_vocab)

    @property
    def n_layer(self) -> int:
        return int(self._native.n_layer)

    @property
    def n_embd(self) -> int:
        return int(self._native.n_embd)

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF metadata as llama.cpp reports it (values as strings)."""
        return dict(self._native.metadata())

    @property
    def summary(self) -> GGUFSummary:
        """Tensor table and expert layout of the file (see `pymoe.gguf_info`)."""
        return self._summary

    def info(self) -> dict[str, Any]:
        """Architecture, sizes, expert layout and bytes by quant type."""
        s = self.summary.as_dict()
        s.update(
            {
                "description": self._native.description,
                "n_ctx": self.n_ctx,
                "n_ctx_train": int(self._native.n_ctx_train),
                "n_params": int(self._native.n_params),
                "n_threads": int(self._native.n_threads),
                "llama_cpp_commit": _core.llama_commit(),
                "offload": {
                    "enabled": self.offload.enabled,
                    "budget": self.offload.budget,
                    "policy": self.offload.policy,
                    "cache_partition": self.settings.cache_partition,
                    "reason": self.offload.reason,
                },
            }
        )
        return s

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Text to token ids. ``add_bos`` adds BOS when the model wants one;
        ``special`` parses control tokens such as ``<|im_start|>``."""
        return self._native.tokenize(text, add_special=add_bos, parse_special=special).tolist()

    def detokenize(self, tokens: Tokens, *, special: bool = False) -> str:
        data = self._native.detokenize(list(tokens), remove_special=False, unparse_special=special)
        return data.decode("utf-8", errors="replace")

    def token_to_bytes(self, token: int, *, special: bool = False) -> bytes:
        return bytes(self._native.token_to_piece(int(token), special=special))

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._native.token_is_eog(int(token)))

    # ------------------------------------------------------------------ evaluation

    def reset(self) -> None:
        """Forgets the cached conversation (the KV cache)."""
        with self._lock:
            self._native.memory_clear()
            self._past = []

    def _check_tokens(self, tokens: Tokens) -> np.ndarray:
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError("tokens must be a flat sequence of token ids")
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            bad = int(arr[(arr < 0) | (arr >= self.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside this model's vocabulary of {self.n_vocab} tokens")
        return arr.astype(np.int32)

    def _decode(self, tokens: np.ndarray, start: int, want_all: bool) -> np.ndarray:
        n = len(tokens)
        pos = np.arange(start, start + n, dtype=np.int32)
        seq = np.zeros(n, dtype=np.int32)
        want = np.ones(n, dtype=np.int8) if want_all else np.zeros(n, dtype=np.int8)
        if not want_all:
            want[-1] = 1
        native = self._native
        if n == 1:  # a generated token: Ctrl-C is seen after it, as between any two tokens
            out = native.decode(tokens, pos, seq, want)
        else:
            try:
                out = interruptible(lambda: native.decode(tokens, pos, seq, want), native.set_abort)
            except BaseException:
                # Ctrl-C (see pymoe._interrupt): the cache keeps nothing of this batch, even where
                # the decode had finished before it could be stopped
                with contextlib.suppress(Exception):
                    native.memory_truncate(0, start)
                raise
        self._tokens_evaluated += n
        return out

    def _feed(self, tokens: Tokens) -> tuple[np.ndarray, int]:
        """Makes the KV cache hold exactly `tokens`, reusing the longest cached
        prefix, and returns the logits after the last token and the number of
        reused tokens."""
        arr = self._check_tokens(tokens)
        if len(arr) == 0:
            raise ValueError("the prompt is empty")
        if len(arr) > self.n_ctx:
            raise ValueError(
                f"the prompt has {len(arr)} tokens but the context holds {self.n_ctx}; "
                "hint: shorten it or load the model with a larger n_ctx"
            )
        common = 0
        limit = min(len(self._past), len(arr) - 1)  # re-evaluate at least one token for its logits
        while common < limit and self._past[common] == arr[common]:
            common += 1
        # drop what the cache holds beyond the common prefix; also repairs a
        # cache left longer than self._past by an interrupted call
        self._native.memory_truncate(0, common)
        self._past = self._past[:common]
        logits = self._decode(arr[common:], common, want_all=False)
        self._past = [int(t) for t in arr]
        return logits[0], common

    def next_token_logits(self, tokens: Tokens) -> np.ndarray:
        """Logits ``[n_vocab]`` of the token after `tokens`, reusing the KV
        cache of the longest prefix shared with the previous call."""
        with self._lock:
            return self._feed(tokens)[0].copy()

    def logits(self, tokens: Tokens) -> np.ndarray:
        """Teacher-forced logits for every position: float32 ``[len(tokens), n_vocab]``.

        Row i is the distribution over the token after ``tokens[: i + 1]``. The
        tokens are used exactly as given (no BOS is added)."""
        with self._lock:
            arr = self._check_tokens(tokens)
            if len(arr) == 0:
                return np.zeros((0, self.n_vocab), dtype=np.float32)
            if len(arr) > self.n_ctx:
                raise ValueError(
                    f"{len(arr)} tokens do not fit the context of {self.n_ctx}; "
                    "hint: load the model with a larger n_ctx"
                )
            self._native.memory_clear()
            self._past = []
            out = self._decode(arr, 0, want_all=True)
            self._past = [int(t) for t in arr]
            return out

    # perplexity(tokens, *, n_ctx, chunks, token_by_token, reference, save_reference, force): see
    # pymoe/perplexity.py; also compares a run with a saved reference (KL divergence, top-1 agreement)
    perplexity = _perplexity

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, **options: Any) -> str:
        """Continues `prompt` (text, or token ids used as given) and returns the generated text.

        The keyword arguments are those of `stream` (temperature, top_k, top_p,
        min_p, repeat_penalty, seed, stop, add_bos, special), which yields the
        same text piece by piece as it is produced."""
        return "".join(self.stream(prompt, max_tokens, **options))

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        *,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        add_bos: bool = True,
        special: bool = False,
    ) -> Generator[str, None, None]:
        """Continues `prompt` (text, or token ids used as given), yielding the text as it is produced.

        ``temperature=0`` is greedy and deterministic; otherwise ``seed`` makes
        sampling repeatable. Generation ends at an end-of-generation token, a
        `stop` string (not included), `max_tokens`, or a full context. It runs
        as the iterator is consumed and holds the model until it ends; leaving
        the loop early (``break``, or ``close()`` on the iterator) stops it
        after the current token, with ``last_stats.finish_reason ==
        "interrupted"``. `generate` returns the whole text instead."""
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, 64, seed)
        if isinstance(prompt, str):
            tokens = self.tokenize(prompt, add_bos=add_bos, special=special)
        else:
            tokens = [int(t) for t in prompt]
        return self._generate_tokens(tokens, max_tokens, sampling, list(stop))

    def chat(
        self, messages: Sequence[Message], max_tokens: int = 512, *, template: str | None = None, **sampling: Any
    ) -> str:
        """Answers the conversation `messages` (``[{"role": "user", "content": "..."}]``)
        formatted with the model's chat template. Keyword arguments are those
        of `stream` (temperature, top_k, ..., seed, stop); `chat_stream` yields the answer piece by piece."""
        return "".join(self.chat_stream(messages, max_tokens, template=template, **sampling))

    def chat_stream(
        self, messages: Sequence[Message], max_tokens: int = 512, *, template: str | None = None, **sampling: Any
    ) -> Generator[str, None, None]:
        """`chat`, as pieces of text while they are produced (see `stream`)."""
        return self.stream(self.chat_tokens(messages, template=template), max_tokens, **sampling)

    def chat_tokens(self, messages: Sequence[Message], *, template: str | None = None) -> list[int]:
        """The prompt tokens `chat` feeds for `messages`: the chat template applied,
        BOS added unless the template already starts with it. Control tokens
        (``<|im_start|>`` ...) come from the template only: a message's text is
        never parsed into them (see `pymoe.chat_template.tokenize_chat`)."""
        prompt = self._render_chat(messages, template=template, add_assistant=True)
        bos_text = self._bos_text()
        add_bos = not (bos_text and prompt.text.startswith(bos_text)) and bool(self._native.add_bos)
        tokens = tokenize_chat(
            prompt,
            tokenize=lambda text, special: self.tokenize(text, add_bos=False, special=special),
            is_control=self._is_control,
            control_text=self._special_text,
        )
        bos = int(self._native.token_bos)
        return [bos, *tokens] if add_bos and bos >= 0 else tokens

    def format_chat(
        self, messages: Sequence[Message], *, template: str | None = None, add_assistant: bool = True
    ) -> str:
        """The prompt text for `messages` under the model's chat template
        (llama.cpp's template engine; a Jinja rendering when llama.cpp does not
        know the template)."""
        return self._render_chat(messages, template=template, add_assistant=add_assistant).text

    def _render_chat(self, messages: Sequence[Message], *, template: str | None, add_assistant: bool) -> ChatPrompt:
        native = self._native

        def builtin(msgs: list[tuple[str, str]], tmpl: str, add_assistant: bool) -> str:
            return str(native.apply_chat_template(msgs, template=tmpl, add_assistant=add_assistant))

        return render_chat(
            messages,
            template if template is not None else self.chat_template(),
            builtin=builtin,
            bos=self._special_text(native.token_bos),
            eos=self._special_text(native.token_eos),
            add_assistant=add_assistant,
        )

    def chat_template(self) -> str:
        """The model's chat template text (empty when the file has none)."""
        return str(self._native.chat_template())

    def _bos_text(self) -> str:
        return self._special_text(self._native.token_bos)

    def _special_text(self, token: int) -> str:
        """The text of a control token such as BOS; empty for -1 (the model has none)."""
        return self.token_to_bytes(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def _is_control(self, token: int) -> bool:
        """Whether `token` is a control token: one that only special parsing
        produces (llama.cpp's CONTROL and UNKNOWN tokens have no text without it)."""
        known = self._control.get(token)
        if known is None:
            known = self._control[token] = not self.token_to_bytes(token) and bool(
                self.token_to_bytes(token, special=True)
            )
        return known

    def stats(self) -> dict[str, Any]:
        """Counters since load, and those of the last generate/chat call."""
        t = self._totals
        return {
            "calls": t.calls,
            "prompt_tokens": t.prompt_tokens,
            "generated_tokens": t.generated_tokens,
            "prompt_seconds": t.prompt_seconds,
            "generate_seconds": t.generate_seconds,
            "context_used": len(self._past),
            "n_ctx": self.n_ctx,
            "last": t.last.as_dict(),
            "experts": self.summary.expert_note(),
            "offload": self.offload_stats(),
        }

    def offload_stats(self, *, raw: bool = False) -> dict[str, Any] | None:
        """The expert-offload engine's counters (None when offload is off):
        totals, hit rate, bytes moved per token, per-layer lists; with
        ``raw=True`` the native per-layer dicts and the [n_layer, n_expert]
        matrix of pairs routed to each expert."""
        if not self.offload.enabled:
            return None
        stats = self._native.offload_stats()
        if raw:
            return stats
        out = summarize_stats(stats, tokens=self._tokens_evaluated)
        # what this OS lets the disk tier do (uncached reads, dropping pages): where it cannot, the
        # page cache may hold expert bytes beside the budget
        out["platform"] = _core.platform_capabilities(str(self.path))
        return out

    def reset_stats(self) -> None:
        """Zeroes the generation totals and the engine's per-layer counters."""
        self._totals = _Totals()
        self._tokens_evaluated = 0
        if self.offload.enabled:
            self._native.offload_reset_stats()

    def _generate_tokens(
        self, tokens: list[int], max_tokens: int, sampling: SamplingParams, stop: list[str]
    ) -> Generator[str, None, None]:
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        stats = GenerationStats(prompt_tokens=len(tokens))
        self._totals.last = stats
        self._totals.calls += 1
        with self._lock:
            t0 = time.perf_counter()
            try:
                logits_ready, cached = self._feed(tokens)
            except KeyboardInterrupt:  # the cache holds what it did before this call
                stats.finish_reason = "interrupted"
                raise
            del logits_ready
            stats.cached_tokens = cached
            stats.prompt_seconds = time.perf_counter() - t0
            self._totals.prompt_tokens += len(tokens) - cached
            self._totals.prompt_seconds += stats.prompt_seconds
            sampler = sampling.make(self.n_vocab)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            pending = ""  # text held back because it may be the start of a stop string
            hold = max((len(s) for s in stop), default=0)
            t1 = time.perf_counter()
            stats.finish_reason = "length"
            try:
                for _ in range(max_tokens):
                    tok = int(sampler.sample(self._native, -1))
                    if self.is_end_of_generation(tok):
                        stats.finish_reason = "stop"
                        break
                    stats.generated_tokens += 1
                    pending += decoder.decode(self.token_to_bytes(tok))
                    if stop:
                        hit = min((i for i in (pending.find(s) for s in stop) if i >= 0), default=-1)
                        if hit >= 0:
                            if hit:
                                yield pending[:hit]
                            pending = ""
                            stats.finish_reason = "stop"
                            break
                        safe = max(0, len(pending) - hold + 1)
                        if safe:
                            yield pending[:safe]
                            pending = pending[safe:]
                    elif pending:
                        yield pending
                        pending = ""
                    if len(self._past) >= self.n_ctx:
                        stats.finish_reason = "length"
                        break
                    self._decode(np.asarray([tok], dtype=np.int32), len(self._past), want_all=False)
                    self._past.append(tok)
                else:
                    stats.finish_reason = "length"
                tail = pending + decoder.decode(b"", final=True)
                if tail:
                    yield tail
            except (GeneratorExit, KeyboardInterrupt):
                stats.finish_reason = "interrupted"
                raise
            finally:
                stats.generate_seconds = time.perf_counter() - t1
                self._totals.generated_tokens += stats.generated_tokens
                self._totals.generate_seconds += stats.generate_seconds

    @property
    def last_stats(self) -> GenerationStats:
        return self._totals.last
