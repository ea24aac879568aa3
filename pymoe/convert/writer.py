"""Writing GGUF files in one streaming pass.

The header (metadata and tensor table) is written first, from the plans:
every tensor's type and byte count are known before its data is read. Then
each tensor's row blocks are loaded (in a background thread, one block ahead),
quantised by ggml through `pymoe._core` (multithreaded, GIL released) and
appended. Memory stays near a few row blocks, whatever the model's size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import shutil
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import gguf
import numpy as np

from .. import _core
from .base import TensorPlan
from .qtypes import TypeChoice, gguf_type, row_bytes

T = TypeVar("T")


@dataclass
class ProgressEvent:
    """Reported after every row block: what was just written and how far along the run is."""

    tensor: str
    tensor_index: int  # 0-based index of the tensor being written
    n_tensors: int
    tensor_done: bool  # this block completed the tensor
    bytes_done: int  # source values processed so far, as float32 bytes
    bytes_total: int


Progress = Callable[[ProgressEvent], None]


@dataclass
class OutputTensor:
    """A planned tensor with the type it gets in the main file and, for
    experts, in the sidecar."""

    plan: TensorPlan
    hi: TypeChoice
    lo: TypeChoice | None = None

    @property
    def nbytes(self) -> int:
        return self.plan.n_rows * row_bytes(self.hi.type, self.plan.row_length)

    @property
    def lo_nbytes(self) -> int:
        return 0 if self.lo is None else self.plan.n_rows * row_bytes(self.lo.type, self.plan.row_length)

    @property
    def f32_bytes(self) -> int:
        return self.plan.n_rows * self.plan.row_length * 4


class GGUFStream:
    """A GGUF file whose tensor table is fixed up front and whose data is
    appended tensor by tensor, block by block."""

    def __init__(
        self, path: Path, writer: gguf.GGUFWriter, tensors: list[tuple[str, tuple[int, ...], str, int]]
    ) -> None:
        """Adds the tensor table to `writer`; `open` writes the header."""
        self.path = path
        self.writer = writer
        self.expected = [(name, nbytes) for name, _, _, nbytes in tensors]
        for name, shape, type_name, nbytes in tensors:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=gguf_type(type_name))
        self.header_end = 0
        self.data_start = 0
        self.index = 0
        self.written = 0

    def open(self) -> GGUFStream:
        """Writes header, metadata and tensor table; data follows with `write`."""
        writer, path = self.writer, self.path
        with self._disk_full_named():
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            assert writer.fout is not None
            self.f: IO[bytes] = writer.fout[0]
            self.header_end = self.f.tell()
            writer.write_padding(self.f, self.f.tell())
            self.data_start = self.f.tell()
        return self

    @property
    def size(self) -> int:
        """The file's size once complete: the header, then each tensor padded to the alignment."""
        align = self.writer.data_alignment
        return self.data_start + sum(n + (-n % align) for _, n in self.expected)

    def reserve(self) -> None:
        """Extends the file to its final size now (a hole where the data will
        go, on filesystems with sparse files), so that llama.cpp's loader can
        check the header before any weight is written (`_core.check_loadable`)."""
        self.f.flush()
        os.truncate(self.path, self.size)

    def write(self, data: np.ndarray) -> None:
        with self._disk_full_named():
            self.f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self.written += data.nbytes

    @contextlib.contextmanager
    def _disk_full_named(self) -> Iterator[None]:
        """A failed write says what it means: numpy and Python report a full
        disk as "5632 requested and 864 written" or a bare errno."""
        try:
            yield
        except OSError as e:
            free = shutil.disk_usage(self.path.parent).free
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) and free > 1 << 20:
                raise
            raise OSError(
                errno.ENOSPC,
                f"the disk is full: writing '{self.path.name}' in '{self.path.parent}' failed with "
                f"{free} bytes free ({e.strerror or e}); hint: free some space, or write the output to "
                "another disk with -o (and --sidecar)",
            ) from e

    def end_tensor(self) -> None:
        name, nbytes = self.expected[self.index]
        if self.written != nbytes:
            raise RuntimeError(
                f"{self.path.name}: tensor '{name}' came out {self.written} bytes, its table says {nbytes}"
            )
        with self._disk_full_named():
            self.writer.write_padding(self.f, nbytes)
        self.index += 1
        self.written = 0

    def release(self) -> None:
        """Closes the file without checks (after a failure; idempotent): what
        is still buffered may not fit a full disk, and the first error is the one to report."""
        with contextlib.suppress(OSError):
            self.writer.close()

    def close(self) -> None:
        if self.index != len(self.expected):
            raise RuntimeError(f"{self.path.name}: {len(self.expected) - self.index} tensor(s) were not written")
        with self._disk_full_named():
            self.f.flush()
            os.fsync(self.f.fileno())
            self.writer.close()


def patch_header(path: Path, header_end: int, placeholder: str, value: str) -> None:
    """Replaces a same-length placeholder string in a written GGUF header (the
    sidecar's binding to its main file, known only when the main is complete)."""
    if len(placeholder) != len(value):
        raise ValueError("a header patch must keep the length")
    with open(path, "r+b") as f:
        head = f.read(header_end)
        at = head.find(placeholder.encode())
        if at < 0 or head.find(placeholder.encode(), at + 1) >= 0:
            raise RuntimeError(f"{path.name}: the header placeholder is not there exactly once")
        f.seek(at)
        f.write(value.encode())
        f.flush()
        os.fsync(f.fileno())


_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Generator[T, None, None]:
    """Iterates `items` in a background thread, `depth` items ahead (disk
    reads and bf16 conversion overlap quantisation). Exceptions surface here."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=run, name="pymoe-convert-read", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


# values per quantisation job: a few ms of work, so that jobs spread evenly
# over the threads even on a busy machine (a slow thread holds up one job, not
# a whole tensor) while the per-job overhead stays small
_JOB_VALUES = 1 << 20


def write_tensors(
    outputs: list[OutputTensor],
    main: GGUFStream,
    sidecar: GGUFStream | None,
    *,
    n_threads: int = 0,
    progress: Progress | None = None,
) -> None:
    """Loads, quantises and writes every tensor, to the main file and (experts
    with a `lo` type) to the sidecar from the same float32 rows.

    Row blocks are cut into jobs of ~1M values that `n_threads` workers
    (default: every CPU) quantise with ggml, one job per worker at a time;
    results are written in order. A background thread reads ahead."""
    total = sum(o.f32_bytes for o in outputs)
    workers = n_threads if n_threads > 0 else os.cpu_count() or 1
    done = 0

    def blocks() -> Iterator[tuple[int, np.ndarray | None]]:
        for i, o in enumerate(outputs):
            for block in o.plan.load():
                if block.ndim != 2 or block.shape[1] != o.plan.row_length:
                    raise RuntimeError(
                        f"'{o.plan.name}': a row block of shape {block.shape}, rows of {o.plan.row_length}"
                    )
                yield i, block
            yield i, None  # end of tensor

    # in file order: (stream, job) to write, or (None, event) to report
    pending: deque[tuple[GGUFStream | None, Any]] = deque()

    def drain(keep: int) -> None:
        nonlocal done
        while len(pending) > keep:
            stream, item = pending.popleft()
            if stream is None:
                done += item.bytes_done
                if isinstance(item, _TensorEnd):
                    main.end_tensor()
                    if item.sidecar:
                        assert sidecar is not None
                        sidecar.end_tensor()
                if progress is not None:
                    progress(ProgressEvent(item.name, item.index, len(outputs), item.end, done, total))
            else:
                stream.write(item.result())

    pool = ThreadPoolExecutor(workers, thread_name_prefix="pymoe-quantise")
    try:
        with contextlib.closing(prefetch(blocks())) as stream:
            for i, block in stream:
                o = outputs[i]
                lo = o.lo if sidecar is not None else None
                if block is None:
                    pending.append((None, _TensorEnd(o.plan.name, i, lo is not None)))
                else:
                    step = max(1, _JOB_VALUES // block.shape[1])
                    for r in range(0, block.shape[0], step):
                        part = block[r : r + step]
                        pending.append((main, pool.submit(_core.quantize, part, o.hi.type, 1)))
                        if lo is not None and sidecar is not None:
                            pending.append((sidecar, pool.submit(_core.quantize, part, lo.type, 1)))
                    pending.append((None, _Block(o.plan.name, i, block.nbytes)))
                drain(keep=4 * workers)
        drain(keep=0)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Block:
    name: str
    index: int
    bytes_done: int
    end: bool = False


@dataclass
class _TensorEnd:
    name: str
    index: int
    sidecar: bool
    bytes_done: int = 0
    end: bool = True
