"""Block-device read-ahead, for the benchmarks in tools/: the read-ahead of the
device a file lives on, and a read-only loop device over a file with its own
read-ahead, so that a benchmark can run an mmap reader at another read-ahead
(the usual kernel default of 128 KiB) without changing the machine's setting.

The loop device reads its file with O_DIRECT (`--direct-io=on`): the file's
own page cache plays no part, only the loop device's, which
`LoopDevice.flush` empties (BLKFLSBUF) before each run."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path

BLKFLSBUF = 0x1261  # _IO(0x12, 97): write back and drop a block device's buffer cache
SECTOR = 512  # a loop device maps whole sectors of its file


def _queue_of(major: int, minor: int) -> Path | None:
    """The sysfs queue/ folder of a block device (its disk's, for a partition)."""
    dev = Path(f"/sys/dev/block/{major}:{minor}")
    if not dev.exists():
        return None
    dev = dev.resolve()
    for d in (dev, dev.parent):  # a partition has no queue/ of its own: its disk's applies
        if (d / "queue" / "read_ahead_kb").is_file():
            return d / "queue"
    return None


def _mount_source(path: Path) -> str | None:
    """The source of the mount that holds `path` (/proc/self/mountinfo), for file systems
    whose st_dev names no block device (btrfs, overlay over a disk)."""
    best, source = -1, None
    target = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            mount = left.split()[4].replace("\\040", " ")
            fields = right.split()
            if len(fields) < 2:
                continue
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > best:
                best, source = len(mount), fields[1]
    return source


def device_read_ahead(path: Path) -> tuple[str, int] | None:
    """(block device name, its read_ahead_kb) of the device that holds `path`; None when
    no block device can be found (a tmpfs, a network file system)."""
    st = os.stat(path)
    devno = st.st_rdev if Path(path).is_block_device() else st.st_dev
    queue = _queue_of(os.major(devno), os.minor(devno))
    if queue is None:
        source = _mount_source(Path(path))
        if source and source.startswith("/dev/"):
            with contextlib.suppress(OSError):
                rdev = os.stat(source).st_rdev
                queue = _queue_of(os.major(rdev), os.minor(rdev))
    if queue is None:
        return None
    return queue.parent.name, int((queue / "read_ahead_kb").read_text())


def loop_attach_argv(path: Path) -> list[str]:
    """The losetup command that attaches `path` read-only to a free loop device, reading it
    with O_DIRECT, and prints the device."""
    return ["losetup", "--find", "--show", "--read-only", "--direct-io=on", str(path)]


def loop_detach_argv(device: str) -> list[str]:
    return ["losetup", "--detach", device]


def loop_problem(path: Path) -> str | None:
    """Why a loop device cannot serve `path` here (None: it can)."""
    size = Path(path).stat().st_size
    if size % SECTOR:
        return (
            f"{path} is {size} bytes, not a whole number of {SECTOR}-byte sectors, and a loop device would cut "
            f"its end off; hint: pad it (`truncate -s %{SECTOR} {path}`: zeros after the last tensor, which "
            "GGUF readers ignore)"
        )
    if os.geteuid() != 0:
        return "a loop device needs root"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control (the loop driver is not available here)"
    return None


def pad_to_sectors(path: Path) -> int:
    """Appends zeros up to a whole number of sectors; returns the bytes added."""
    size = Path(path).stat().st_size
    pad = -size % SECTOR
    if pad:
        os.truncate(path, size + pad)
    return pad


class LoopDevice:
    """A read-only loop device over `path` (O_DIRECT on the file) with `read_ahead_kb`;
    detached on exit, whatever the exit (the caller turns SIGTERM/SIGHUP into exceptions)."""

    def __init__(self, path: Path, read_ahead_kb: int) -> None:
        self.path = Path(path)
        self.read_ahead_kb = read_ahead_kb
        self.device: str | None = None
        self.direct_io: bool | None = None

    @property
    def name(self) -> str:
        assert self.device is not None
        return Path(self.device).name

    def __enter__(self) -> LoopDevice:
        problem = loop_problem(self.path)
        if problem:
            raise RuntimeError(problem)
        proc = subprocess.run(loop_attach_argv(self.path), capture_output=True, text=True)
        if proc.returncode != 0 or not proc.stdout.strip().startswith("/dev/"):
            raise RuntimeError(f"losetup failed: {proc.stderr.strip() or proc.stdout.strip()}")
        self.device = proc.stdout.strip()
        try:
            queue = Path("/sys/block") / self.name / "queue"
            (queue / "read_ahead_kb").write_text(str(self.read_ahead_kb))
            self.read_ahead_kb = int((queue / "read_ahead_kb").read_text())  # what the kernel kept
            dio = Path("/sys/block") / self.name / "loop" / "dio"
            self.direct_io = dio.read_text().strip() == "1" if dio.is_file() else None
        except BaseException:
            self.__exit__()
            raise
        return self

    def flush(self) -> None:
        """Drops the loop device's cached pages (the next reader reads the file)."""
        assert self.device is not None
        fd = os.open(self.device, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, BLKFLSBUF, 0)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        if self.device is None:
            return
        device, self.device = self.device, None
        proc = subprocess.run(loop_detach_argv(device), capture_output=True, text=True)
        if proc.returncode != 0:  # not raised: it would hide the exception that may be unwinding
            print(
                f"warning: could not detach {device}: {proc.stderr.strip()}; hint: run `losetup --detach {device}` "
                "once nothing uses it",
                file=sys.stderr,
            )
