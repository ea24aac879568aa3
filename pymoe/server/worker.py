"""The job queue and the one thread that owns the `Model`.

A llama.cpp context holds one sequence, so requests are generated one at a
time, in arrival order, from a bounded queue: at most one generating plus
``queue_size`` waiting. Each accepted request is a `Job`; the worker puts the
answer's events into the job's queue and the connection thread reads them.
A job whose client went away is withdrawn: dropped from the queue, or its
generation stopped after the current token."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Any

from ..model import Model
from .protocol import ApiError, CompletionRequest

log = logging.getLogger("pymoe.server")

DEFAULT_QUEUE_SIZE = 16

Event = tuple[str, Any]


class Counters:
    """Named integer counters behind a lock."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n  # an unknown name is a KeyError: counters are declared up front

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class Job:
    """One accepted request: the worker puts events in `events`, the connection thread reads them.

    Events: ("start", prompt_tokens), ("piece", text), ("end", (finish_reason, completion_tokens)),
    ("error", ApiError)."""

    def __init__(self, req: CompletionRequest) -> None:
        self.req = req
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.cancelled = threading.Event()


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error")


class Worker:
    """Owns `model` in one thread and answers the jobs of `submit` in arrival order.

    ``max_tokens_limit`` is the answer length of a request that gives no
    ``max_tokens``. `stats()` returns the queue's counters and `Model.stats()`
    as of the last finished request, so that it never waits for a generation."""

    def __init__(self, model: Model, *, queue_size: int, max_tokens_limit: int) -> None:
        self.model = model
        self.queue_size = queue_size
        self.max_tokens_limit = max_tokens_limit
        self.n_ctx = model.n_ctx
        self.n_vocab = model.n_vocab
        self.counters = Counters(
            "completions",  # requests accepted into the queue
            "completed",  # answered in full
            "rejected_busy",  # 429: the queue was full
            "disconnected",  # clients that went away before their answer was complete
            "prompt_tokens",
            "completion_tokens",
        )
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._model_stats = model.stats()  # refreshed after each request
        self._thread = threading.Thread(target=self._work, name="pymoe-serve-worker", daemon=True)

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        """Starts the worker thread (once)."""
        with self._cond:
            if self._thread.ident is None and not self._stopping:
                self._thread.start()

    def stop(self) -> None:
        """Refuses new jobs and the waiting ones (503); the running generation stops after its current token."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            waiting = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in waiting:
            job.events.put(("error", _shutting_down()))

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ queue

    def submit(self, req: CompletionRequest) -> Job:
        """Queues a request; raises ApiError 429 when `queue_size` requests already wait
        behind the running one, 503 when the worker is stopping."""
        job = Job(req)
        with self._cond:
            if self._stopping:
                raise _shutting_down()
            if len(self._jobs) + (self._running is not None) > self.queue_size:
                self.counters.add("rejected_busy")
                raise ApiError(
                    429,
                    f"the server is busy: one request is being answered and {len(self._jobs)} are waiting "
                    f"(the limit is {self.queue_size}, set with --queue-size); retry later",
                    type="server_busy",
                    code="queue_full",
                )
            self._jobs.append(job)
            self.counters.add("completions")
            self._cond.notify_all()
        return job

    def withdraw(self, job: Job, *, disconnected: bool) -> None:
        """The connection is done with `job`: drops it from the queue if it still waits and
        stops its generation if it runs."""
        with self._cond:
            if disconnected and not job.cancelled.is_set():
                self.counters.add("disconnected")
            job.cancelled.set()
            if job in self._jobs:
                self._jobs.remove(job)

    def stats(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the queue's state and counters, `Model.stats()` as of the last finished request)."""
        with self._cond:
            queue_state = {
                "queued": len(self._jobs),
                "running": self._running is not None,
                "queue_size": self.queue_size,
                "max_tokens_limit": self.max_tokens_limit,
                "n_ctx": self.n_ctx,
                **self.counters.snapshot(),
            }
            return queue_state, self._model_stats

    # ------------------------------------------------------------------ the thread

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
                self._running = job
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
            except ApiError as e:
                job.events.put(("error", e))
            except ValueError as e:  # the model refused the input
                job.events.put(("error", ApiError(400, str(e))))
            except Exception:  # the details go to the log, not to the client
                log.exception("generation failed")
                job.events.put(
                    ("error", ApiError(500, "generation failed; the server's log has the details", type="server_error"))
                )
            finally:
                try:
                    stats = self.model.stats()
                except Exception:
                    log.exception("reading the model's counters failed")
                    stats = self._model_stats
                with self._cond:
                    self._running = None
                    self._model_stats = stats

    def _tokens(self, req: CompletionRequest) -> list[int]:
        model = self.model
        if req.chat:
            return model.chat_tokens(req.messages)
        if isinstance(req.prompt, str):
            return model.tokenize(req.prompt, add_bos=True, special=False)
        bad = [t for t in req.prompt if not 0 <= t < self.n_vocab]
        if bad:
            raise ApiError(
                400, f"token id {bad[0]} is outside this model's vocabulary of {self.n_vocab} tokens", param="prompt"
            )
        return list(req.prompt)

    def _generate(self, job: Job) -> None:
        req = job.req
        tokens = self._tokens(req)
        n = len(tokens)
        param = "messages" if req.chat else "prompt"
        if n == 0:
            raise ApiError(400, "the prompt is empty", param=param)
        if n >= self.n_ctx:
            raise ApiError(
                400,
                f"the prompt is {n} tokens long but the model's context holds {self.n_ctx} tokens, with at least "
                "one left for the answer; shorten the prompt (or drop old messages), or start the server with a "
                "larger --ctx-size",
                param=param,
                code="context_length_exceeded",
            )
        max_tokens = min(req.max_tokens or self.max_tokens_limit, self.n_ctx - n)
        job.events.put(("start", n))
        pieces = self.model.stream(tokens, max_tokens, stop=req.stop, **req.sampling)
        stopped = False
        try:
            for piece in pieces:
                job.events.put(("piece", piece))
                if job.cancelled.is_set() or self._stopping:
                    stopped = True
                    break
        finally:
            pieces.close()  # stops the generation after the current token and frees the model
        last = self.model.last_stats
        if stopped:
            if not job.cancelled.is_set():
                job.events.put(("error", _shutting_down()))
            return
        self.counters.add("completed")
        self.counters.add("prompt_tokens", n)
        self.counters.add("completion_tokens", last.generated_tokens)
        finish = last.finish_reason if last.finish_reason in ("stop", "length") else "stop"
        job.events.put(("end", (finish, last.generated_tokens)))
