"""Writing output files safely: never over the input, never over an existing
file without ``force``, always through a temporary file in the same folder
that is renamed into place only when complete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_path(out: Path, *, inputs: tuple[Path, ...] = (), force: bool = False) -> None:
    for inp in inputs:
        if out.exists() and inp.exists() and out.resolve() == inp.resolve():
            raise FileExistsError(f"'{out}' is also an input; hint: choose another output path")
    if out.is_dir():
        raise IsADirectoryError(f"output '{out}' is a directory; hint: pass a file path")
    if out.exists() and not force:
        raise FileExistsError(f"'{out}' already exists; hint: delete it or pass --force to overwrite")
    if not out.parent.exists():
        raise FileNotFoundError(f"the folder of '{out}' does not exist; hint: create it first")


@contextmanager
def atomic_output(out: str | os.PathLike[str], *, inputs: tuple[Path, ...] = (), force: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `out`; on normal exit it is renamed to
    `out`, on any exception (KeyboardInterrupt included) it is deleted."""
    out = Path(out)
    check_output_path(out, inputs=inputs, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
