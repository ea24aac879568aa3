"""ggml's AMX weight repacking stays out of the build unless PYMOE_CPU_AMX=ON
(it segfaults at the first decode with the pinned llama.cpp on CPUs with AMX;
cmake/pymoe-cpu-amx.cmake), in the extension and in the llama-bench baseline
that tools/build_llama_tools.sh builds, while the other repacking stays in.

This machine need not have AMX: the compile commands the builds recorded are
run again with the compiler targeting an AMX CPU (-march=sapphirerapids in
place of -march=native), as on a Sapphire Rapids machine, and must still
compile the AMX code out (docs/fuzzing.md, "AMX")."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from pymoe import _core

AMX_CPU = "-march=sapphirerapids"
NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")


def build_dirs(pattern: str) -> list[Path]:
    """Build folders (with recorded compile commands) whose PYMOE_CPU_AMX is off."""
    out = []
    for d in sorted(ROOT.glob(pattern)):
        cache = d / "CMakeCache.txt"
        recorded = (d / "compile_commands.json").is_file() and cache.is_file()
        if recorded and "PYMOE_CPU_AMX:BOOL=ON" not in cache.read_text(errors="replace"):
            out.append(d)
    return out


def compile_command(build: Path, source_suffix: str) -> tuple[list[str], str]:
    """The recorded command for a source file, its output and -c removed: (argv, directory)."""
    entries = json.loads((build / "compile_commands.json").read_text())
    e = next(x for x in entries if x["file"].endswith(source_suffix))
    args = shlex.split(e["command"]) if "command" in e else list(e["arguments"])
    if "-o" in args:
        i = args.index("-o")
        del args[i : i + 2]
    args = [a for a in args if a not in ("-c", e["file"])]
    return args, e["directory"]


def for_amx_cpu(args: list[str]) -> list[str]:
    """The command as a build on an AMX machine runs it: -march=native means sapphirerapids there."""
    if "-march=native" in args:
        return [AMX_CPU if a == "-march=native" else a for a in args]
    return [*args, AMX_CPU]


def amx_macros(args: list[str], directory: str, source: str) -> set[str]:
    proc = subprocess.run([*args, "-E", "-dM", source], capture_output=True, text=True, cwd=directory, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("#define __AMX")}


def check_build(build: Path, tmp_path: Path) -> None:
    src = next(iter(json.loads((build / "compile_commands.json").read_text())))["file"]
    llama = Path(src[: src.index("/ggml/src/")]) if "/ggml/src/" in src else ROOT / "third_party" / "llama.cpp"
    for suffix in ("ggml-cpu/ggml-cpu.cpp", "ggml-cpu/amx/amx.cpp"):
        args, directory = compile_command(build, suffix)
        source = str(llama / "ggml" / "src" / suffix)
        assert all(flag in args for flag in NO_AMX), f"{build.name}: {suffix} is compiled without {NO_AMX}"
        # the check can fail: without those flags the same command targets AMX
        bare = [a for a in for_amx_cpu(args) if a not in NO_AMX]
        assert "__AMX_INT8__" in amx_macros(bare, directory, source)
        # ... and with them it does not (ggml's AMX code needs __AMX_INT8__)
        assert amx_macros(for_amx_cpu(args), directory, source) == set(), f"{build.name}: {suffix}"
    # the AMX translation unit then defines nothing: no buffer type, no kernels
    args, directory = compile_command(build, "ggml-cpu/amx/amx.cpp")
    obj = tmp_path / f"{build.name}-amx.o"
    source = str(llama / "ggml" / "src" / "ggml-cpu" / "amx" / "amx.cpp")
    subprocess.run([*for_amx_cpu(args), "-c", source, "-o", str(obj)], check=True, cwd=directory, timeout=600)
    defined = subprocess.run(["nm", "--defined-only", "-C", str(obj)], capture_output=True, text=True, check=True)
    assert "amx" not in defined.stdout.lower(), defined.stdout[:2000]


def test_the_extension_has_no_amx_buffer_type_unless_asked():
    bufts = _core.cpu_extra_buffer_types()
    if _core.build_cpu_amx():
        pytest.skip("built with PYMOE_CPU_AMX=ON")
    assert "AMX" not in bufts
    assert "CPU_REPACK" in bufts  # the other repacking stays (measurably faster)
    assert "AMX_INT8" not in _core.system_info()
    assert "CPU extra buffer types = " + ",".join(bufts) in _core.system_info()


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_the_extension_build_compiles_amx_out_even_for_an_amx_cpu(tmp_path):
    builds = build_dirs("build/cp*")
    if not builds:
        pytest.skip("no build folder with compile commands (an installed wheel)")
    for build in builds:
        check_build(build, tmp_path)


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_the_llama_bench_baseline_compiles_amx_out_too(tmp_path):
    builds = build_dirs("build/llama-tools")
    if not builds:
        pytest.skip("llama-bench not built (tools/build_llama_tools.sh)")
    check_build(builds[0], tmp_path)
    bench = builds[0] / "bin" / "llama-bench"
    if bench.is_file():
        symbols = subprocess.run(["nm", "-C", str(bench)], capture_output=True, text=True, check=True).stdout
        assert "ggml_backend_amx_buffer_type" not in symbols


def test_every_script_that_builds_llama_bench_applies_the_amx_setting():
    """A llama-bench baseline built without cmake/pymoe-cpu-amx.cmake would
    repack into AMX on such a CPU: it would crash, or compare other CPU code."""
    scripts = [p for p in sorted((ROOT / "tools").glob("*.sh")) if "llama-bench" in p.read_text()]
    assert scripts, "no script builds llama-bench"
    for script in scripts:
        text = script.read_text()
        if "--target" not in text or "llama-bench" not in text.split("--target", 1)[1]:
            continue  # mentions it, builds no llama-bench
        assert 'CMAKE_PROJECT_INCLUDE="$root/cmake/pymoe-cpu-amx.cmake"' in text, script.name
        assert 'PYMOE_CPU_AMX="${PYMOE_CPU_AMX:-OFF}"' in text, script.name
