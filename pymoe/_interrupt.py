"""Ctrl-C during a native decode.

Python runs signal handlers in the main thread only, between bytecodes: never
while that thread is inside a native call, even with the GIL released. So a
decode called from the main thread runs in a helper thread instead, while the
main thread waits where Ctrl-C reaches it. On KeyboardInterrupt (or any
exception a SIGINT handler raises) the native model's abort flag is set:
llama.cpp's abort callback sees it after the graph node being computed, the
decode drops what it added to the KV cache and returns; then the flag is
cleared and the exception goes on.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable
from typing import Any


class _Job:
    __slots__ = ("call", "cancelled", "done", "error", "result")

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.cancelled = False  # set before the helper starts it: it never runs
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_helper: threading.Thread | None = None
_start_lock = threading.Lock()


def _serve() -> None:
    if hasattr(signal, "pthread_sigmask"):  # POSIX: SIGINT goes to the main thread, not here
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # nor to the compute threads this one starts
    while True:
        job = _jobs.get()
        try:
            if not job.cancelled:
                job.result = job.call()
        except BaseException as e:  # handed to the waiting caller
            job.error = e
        finally:
            job.done.set()


def _retry(step: Callable[[], Any]) -> None:
    """`step()` to its end, through further Ctrl-C presses."""
    while True:
        try:
            step()
            return
        except BaseException:  # a further Ctrl-C: what is waited for ends within one graph node
            continue


def _drain() -> None:
    """Returns when the helper has finished (or skipped) every job queued so far."""
    barrier = _Job(lambda: None)
    _retry(lambda: _jobs.put(barrier))  # FIFO: done after everything before it
    _retry(barrier.done.wait)


def interruptible(call: Callable[[], Any], set_abort: Callable[[bool], None]) -> Any:
    """`call()`, a native call that stops soon after `set_abort(True)`. From
    the main thread with a Python SIGINT handler, Ctrl-C interrupts it; the
    exception goes on once the call has returned."""
    if threading.current_thread() is not threading.main_thread() or not callable(signal.getsignal(signal.SIGINT)):
        return call()
    global _helper
    with _start_lock:
        if _helper is None:
            _helper = threading.Thread(target=_serve, name="pymoe-decode", daemon=True)
            _helper.start()
    job = _Job(call)
    try:
        _jobs.put(job)
        job.done.wait()
    except BaseException:  # KeyboardInterrupt, or what another SIGINT handler raises
        job.cancelled = True
        set_abort(True)
        try:
            _drain()
        finally:
            set_abort(False)
        raise
    if job.error is not None:
        raise job.error
    return job.result
