#!/usr/bin/env python3
"""Cross-compile the extension's C++ for macOS (Apple silicon) and Windows
(x86_64) with Zig's clang (`pip install ziglang`), no SDK: a check, run in CI,
that pymoe builds on the laptops it is meant for. Nothing here runs the
result (docs/wheels.md says what that leaves unverified).

Per target, in build/cross/TARGET:
  1. llama.cpp (third_party/llama.cpp, patched) configured with CMake as
     CMakeLists.txt configures it, CPU only: Metal, Accelerate, BLAS and
     OpenMP off (they need Apple's SDK or a libomp that Zig does not ship);
     the ggml CPU backend with the instruction sets a wheel's portable build
     uses (x86-64: AVX2/FMA/F16C/BMI2; Apple silicon: armv8.x NEON). Targets
     llama and ggml (ggml-base, ggml-cpu).
  2. native/*.cpp, the sources of CMakeLists.txt's PYMOE_CORE_SOURCES and
     bindings.cpp, compiled with the flags of CMakeLists.txt (bindings.cpp
     against pybind11 and this interpreter's CPython headers: macOS only, as
     Linux's pyconfig.h does not describe Windows).
  3. Links, with every symbol resolved: a shared library of the pymoe core
     and llama.cpp (libpymoe_core.dylib / pymoe_core.dll). On macOS also the
     extension module itself (_core.cpython-3XY-darwin.so, linked with
     `-undefined dynamic_lookup` as macOS extensions are: CPython's symbols
     come from the interpreter that loads it). On Windows the .pyd is not
     linked: that needs the Windows CPython headers and python3XY.lib.

Objects are kept between runs (ninja for llama.cpp; native objects rebuild when
a source or a header they include changed). Zig builds its libc++ for each
target once, into its global cache (~1-3 minutes each on 2 cores).

Usage:
  python tools/cross_compile.py                        # both targets
  python tools/cross_compile.py --target aarch64-macos -j 2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "third_party" / "llama.cpp"
NATIVE = ROOT / "native"


@dataclass(frozen=True)
class Target:
    triple: str  # zig's -target
    system: str  # CMAKE_SYSTEM_NAME
    processor: str  # CMAKE_SYSTEM_PROCESSOR
    cmake: tuple[str, ...]  # extra llama.cpp options
    shared: str  # file name of the core's shared library
    system_libs: tuple[str, ...]  # what the link needs from the OS
    bindings: bool  # bindings.cpp compiles here (this interpreter's CPython headers fit the target)
    extension: str | None  # file name of the extension module, when it can be linked here
    pic: bool


PY_TAG = f"{sys.version_info.major}{sys.version_info.minor}"

TARGETS = {
    # MACOSX_DEPLOYMENT_TARGET of pyproject.toml's cibuildwheel configuration
    "aarch64-macos": Target(
        triple="aarch64-macos.13.3",
        system="Darwin",
        processor="arm64",
        cmake=("-DGGML_METAL=OFF", "-DGGML_ACCELERATE=OFF", "-DGGML_BLAS=OFF", "-DCMAKE_INSTALL_NAME_TOOL=/bin/true"),
        shared="libpymoe_core.dylib",
        system_libs=(),
        bindings=True,
        extension=f"_core.cpython-{PY_TAG}-darwin.so",
        pic=True,
    ),
    # a wheel's portable x86-64 build (GGML_NATIVE=OFF, not cross-compiling) turns these on
    "x86_64-windows-gnu": Target(
        triple="x86_64-windows-gnu",
        system="Windows",
        processor="AMD64",
        cmake=(
            *(f"-DGGML_{x}=ON" for x in ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C")),
            "-DCMAKE_RC_COMPILER=/bin/false",
        ),
        shared="pymoe_core.dll",
        system_libs=("-lws2_32",),  # sockets: ggml's RPC backend, native/pymoe-devices.cpp
        bindings=False,  # Linux's pyconfig.h does not describe Windows (sizes, sys/select.h)
        extension=None,
        pic=False,
    ),
}

# what a build without an SDK needs, after CMakeLists.txt's own llama.cpp options
LLAMA_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=OFF",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_BUILD_NUMBER=11312",
)

# (folder, name): libNAME.a, or NAME.a where ggml drops the prefix (Windows); absent ones are skipped
LLAMA_LIBS = (
    ("src", "llama"),
    ("ggml/src", "ggml"),
    ("ggml/src/ggml-rpc", "ggml-rpc"),
    ("ggml/src", "ggml-cpu"),
    ("ggml/src", "ggml-base"),
)


class CrossError(Exception):
    pass


def zig_exe() -> Path:
    try:
        import ziglang
    except ImportError:
        raise CrossError("the ziglang package is not installed; hint: pip install ziglang") from None
    exe = Path(ziglang.__file__).parent / "zig"
    if not exe.is_file():
        raise CrossError(f"no zig binary in {exe.parent}; hint: pip install --force-reinstall ziglang")
    return exe


def core_sources() -> list[Path]:
    """PYMOE_CORE_SOURCES of CMakeLists.txt, so the two lists cannot drift apart."""
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"set\(PYMOE_CORE_SOURCES\s+(.*?)\)", text, re.S)
    if not m:
        raise CrossError("CMakeLists.txt has no set(PYMOE_CORE_SOURCES ...); hint: keep the list in that form")
    return [ROOT / s for s in m.group(1).split()]


def cmake_options() -> list[str]:
    """The `set(GGML_X/LLAMA_X ON|OFF CACHE BOOL "" FORCE)` options of CMakeLists.txt, as -D flags."""
    text = (ROOT / "CMakeLists.txt").read_text()
    found = re.findall(r"set\(((?:GGML|LLAMA)_\w+)\s+(ON|OFF)\s+CACHE\s+BOOL", text)
    return [f"-D{name}={value}" for name, value in found]


def llama_commit() -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fetch_llama_cpp.py"), "--print-commit"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def write_wrappers(out: Path, zig: Path, triple: str) -> dict[str, Path]:
    """CMake wants one executable per tool: shell wrappers around `zig cc -target ...`."""
    tools = {"cc": f"cc -target {triple}", "c++": f"c++ -target {triple}", "ar": "ar", "ranlib": "ranlib"}
    paths = {}
    for name, args in tools.items():
        p = out / f"zig-{name}"
        p.write_text(f'#!/bin/sh\nexec "{zig}" {args} "$@"\n')
        p.chmod(0o755)
        paths[name] = p
    return paths


def run(cmd: list[str], log: Path, what: str) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise CrossError(f"{what} failed (exit {proc.returncode}); the end of {log}:\n{tail}")


def build_llama(t: Target, out: Path, tools: dict[str, Path], jobs: int, log: Path) -> None:
    build = out / "llama.cpp"
    cmake = shutil.which("cmake")
    if cmake is None:
        raise CrossError("cmake is not on PATH; hint: pip install cmake ninja")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    # configured every time: quick once the cache exists, and it picks up changed options
    run(
        [
            cmake,
            "-S",
            str(LLAMA),
            "-B",
            str(build),
            *gen,
            f"-DCMAKE_SYSTEM_NAME={t.system}",
            f"-DCMAKE_SYSTEM_PROCESSOR={t.processor}",
            f"-DCMAKE_C_COMPILER={tools['cc']}",
            f"-DCMAKE_CXX_COMPILER={tools['c++']}",
            f"-DCMAKE_AR={tools['ar']}",
            f"-DCMAKE_RANLIB={tools['ranlib']}",
            *cmake_options(),
            *LLAMA_OPTIONS,
            *t.cmake,
        ],
        log,
        "configuring llama.cpp",
    )
    run([cmake, "--build", str(build), "-j", str(jobs), "--target", "llama", "ggml"], log, "building llama.cpp")


def stale(obj: Path, dep: Path) -> bool:
    """True when `obj` is missing or older than a file its dependency list (-MMD) names."""
    if not obj.is_file() or not dep.is_file():
        return True
    t = obj.stat().st_mtime
    files = dep.read_text().replace("\\\n", " ").split(":", 1)[-1].split()
    return any(not Path(f).is_file() or Path(f).stat().st_mtime > t for f in files)


def compile_native(
    t: Target, out: Path, tools: dict[str, Path], jobs: int, log: Path
) -> tuple[list[Path], Path | None]:
    """The pymoe core's objects and bindings.o (None where it cannot compile here)."""
    import pybind11

    objdir = out / "native"
    objdir.mkdir(exist_ok=True)
    common = [
        str(tools["c++"]),
        "-std=c++17",
        "-O2",
        "-DNDEBUG",
        "-Wall",
        "-Wextra",
        *(["-fPIC"] if t.pic else []),
        f"-I{NATIVE}",
        f"-I{LLAMA / 'include'}",
        f"-I{LLAMA / 'ggml' / 'include'}",
    ]
    commit = llama_commit()
    jobs_list = []
    sources = core_sources() + ([NATIVE / "bindings.cpp"] if t.bindings else [])
    for src in sources:
        obj = objdir / (src.stem + ".o")
        flags = [f'-DPYMOE_LLAMA_COMMIT="{commit}"']
        if src.name == "pymoe-hook.cpp":
            flags.append(f"-I{LLAMA / 'src'}")  # as CMakeLists.txt: only the hook sees llama.cpp's internals
        if src.name == "bindings.cpp":
            flags = ["-fvisibility=hidden", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        jobs_list.append((src, obj, [*common, *flags, "-MMD", "-MF", str(obj.with_suffix(".d")), "-c", str(src)]))

    def one(job: tuple[Path, Path, list[str]]) -> str:
        src, obj, cmd = job
        if not stale(obj, obj.with_suffix(".d")):
            return ""
        proc = subprocess.run([*cmd, "-o", str(obj)], capture_output=True, text=True)
        text = f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
        if proc.returncode != 0:
            obj.unlink(missing_ok=True)
            raise CrossError(f"compiling {src.relative_to(ROOT)} for {t.triple} failed:\n{proc.stderr[-4000:]}")
        return text

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        texts = list(ex.map(one, jobs_list))
    with log.open("a") as f:
        f.write("".join(texts))
    warnings = sum(x.count("warning:") for x in texts)
    if warnings:
        print(f"  {warnings} compiler warnings in native/ (see {log})")
    objs = [obj for _, obj, _ in jobs_list]
    return (objs[:-1], objs[-1]) if t.bindings else (objs, None)


def link(
    t: Target, out: Path, tools: dict[str, Path], core: list[Path], bindings: Path | None, log: Path
) -> list[Path]:
    libs = []
    for folder, name in LLAMA_LIBS:
        d = out / "llama.cpp" / folder
        libs += [str(p) for p in (d / f"lib{name}.a", d / f"{name}.a") if p.is_file()][:1]
    libs += list(t.system_libs)
    made = []
    shared = out / t.shared
    # the core's objects in full, llama.cpp as far as they use it: every symbol must resolve
    run([str(tools["c++"]), "-shared", "-o", str(shared), *map(str, core), *libs], log, f"linking {t.shared}")
    made.append(shared)
    if t.extension and bindings:
        ext = out / t.extension
        cmd = [str(tools["c++"]), "-shared", "-undefined", "dynamic_lookup", "-o", str(ext), str(bindings)]
        run([*cmd, *map(str, core), *libs], log, f"linking {t.extension}")
        made.append(ext)
    return made


def cross_compile(name: str, jobs: int) -> float:
    t = TARGETS[name]
    zig = zig_exe()
    out = ROOT / "build" / "cross" / name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    log.write_text("")
    tools = write_wrappers(out, zig, t.triple)
    t0 = time.perf_counter()
    build_llama(t, out, tools, jobs, log)
    t1 = time.perf_counter()
    core, bindings = compile_native(t, out, tools, jobs, log)
    t2 = time.perf_counter()
    made = link(t, out, tools, core, bindings, log)
    t3 = time.perf_counter()
    print(
        f"{name}: llama.cpp {t1 - t0:.0f} s, native/ ({len(core) + bool(bindings)} files) {t2 - t1:.0f} s, "
        f"link {t3 - t2:.0f} s: " + ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in made)
    )
    return t3 - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", choices=sorted(TARGETS), action="append", help="default: all")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    a = ap.parse_args()
    if not (LLAMA / "CMakeLists.txt").is_file():
        print(f"error: {LLAMA} is missing; hint: run python tools/fetch_llama_cpp.py", file=sys.stderr)
        return 1
    total = 0.0
    try:
        for name in a.target or sorted(TARGETS):
            total += cross_compile(name, a.jobs)
    except CrossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"cross-compiled in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
