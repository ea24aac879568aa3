"""Settings in one place: the native defaults, the CLI flags and the docs derive from pymoe.Settings."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from pymoe import _core
from pymoe.gguf_info import summarize
from pymoe.settings import Settings, add_arguments, flag_of, from_args

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

# native fields that Settings decides itself (from 'auto' values, the file, or a differently shaped setting)
DERIVED = {
    "path",
    "n_seq_max",
    "enabled",
    "tier",
    "budget",
    "per_layer",
    "lo_path",
    "w_recency",
    "w_frequency",
    "w_precision",
    "profile",
    "replay",
    "replay_weights",
    "record_path",  # record_routing (None: "")
    "offload",
}


def native_fields(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def test_defaults_are_the_native_ones():
    p, s = _core.ModelParams(), Settings()
    for name in native_fields(p) - DERIVED:
        native = getattr(p, name)
        assert getattr(s, name) == (tuple(native) if isinstance(native, list) else native), name
    for name in native_fields(p.offload) - DERIVED:
        assert getattr(s, name) == pytest.approx(getattr(p.offload, name)), name
    assert s.multidim_weights == (p.offload.w_recency, p.offload.w_frequency, p.offload.w_precision)
    assert s.cache_partition == ("layer" if p.offload.per_layer else "shared")


def test_every_native_field_is_set_from_the_settings(demo_gguf):
    """A setting that Settings forgets to pass on keeps its native default: change every one and check."""
    changed = Settings(
        n_ctx=128,
        n_batch=64,
        n_ubatch=32,
        n_threads=1,
        n_gpu_layers=3,
        use_mmap=False,
        repack=False,
        flash_attn=True,
        cache_type="f32",
        rpc=(),
        offload="on",
        expert_budget=0.5,
        policy="lfu",
        cache_partition="shared",
        offload_tier="host",
        cpu_assist=False,
        lo_share=0.5,
        lo_threshold=0.3,
        prefetch=True,
        prefetch_depth=2,
        direct_io=False,
        io_threads=2,
        prefetch_max_tokens=7,
        admission=False,
        stream=False,
        skip_threshold=0.1,
        skip_renormalize=True,
        multidim_weights=(0.5, 2.0, 3.0),
        profile=[[1.0]],
        record_routing="run.routes",
    )
    p, offload, _ = changed.resolve(demo_gguf, summarize(demo_gguf))
    default = _core.ModelParams()
    for name in native_fields(p) - DERIVED - {"rpc"}:  # rpc: test_rpc.py (a server is needed)
        assert getattr(p, name) != getattr(default, name), f"{name} is not passed to the native side"
        assert getattr(p, name) == getattr(changed, name)
    for name in native_fields(p.offload) - {"replay", "replay_weights", "lo_path"}:
        assert getattr(p.offload, name) != getattr(default.offload, name), f"offload.{name} is not passed on"
    assert offload.enabled and p.offload.enabled
    assert p.offload.per_layer is False and p.offload.tier == "host" and p.offload.profile == [1.0]
    assert (p.offload.w_recency, p.offload.w_frequency, p.offload.w_precision) == (0.5, 2.0, 3.0)
    assert p.offload.record_path == "run.routes"


def test_recording_the_routing_needs_the_engine(demo_gguf):
    summary = summarize(demo_gguf)
    # every expert fits: auto would run the model resident, but the router is read by the engine
    assert not Settings(expert_budget="100GiB").resolve(demo_gguf, summary)[1].enabled
    assert Settings(expert_budget="100GiB", record_routing="r").resolve(demo_gguf, summary)[1].enabled
    with pytest.raises(ValueError, match=r"needs the expert engine.*offload is off"):
        Settings(offload="off", record_routing="r").resolve(demo_gguf, summary)


def parse(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)))


def test_flags_derive_from_the_settings():
    assert parse() == Settings()
    s = parse(
        "-c", "256", "-b", "8", "-t", "1", "--no-mmap", "--no-repack", "--offload", "on", "--expert-budget", "0.25",
        "--policy", "multidim", "--no-cpu-assist", "--lo-threshold", "0.1", "--prefetch", "--prefetch-depth", "2",
    )  # fmt: skip
    assert s == Settings(
        n_ctx=256,
        n_batch=8,
        n_threads=1,
        use_mmap=False,
        repack=False,
        offload="on",
        expert_budget=0.25,
        policy="multidim",
        cpu_assist=False,
        lo_threshold=0.1,
        prefetch=True,
        prefetch_depth=2,
    )
    assert parse("--expert-budget", "6GiB").expert_budget == "6GiB"


def test_bad_values_are_refused_with_the_flag_named():
    with pytest.raises(ValueError, match="--ctx-size"):
        Settings(n_ctx=-1)
    with pytest.raises(ValueError, match="policy must be one of"):
        Settings(policy="nope")
    with pytest.raises(TypeError, match=r"unknown setting.*n_ctxx.*Settings\.describe"):
        Settings().replace(n_ctxx=5)
    assert flag_of("n_ctx") == "--ctx-size" and flag_of("profile") == "profile"


def test_the_readme_lists_every_offload_flag():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| flag | meaning |") :]
    table = table[: table.index("\n\n")]
    for f in FIELDS.values():
        if f.metadata["group"].startswith("expert offload"):
            for flag in f.metadata["flags"]:
                if flag.startswith("--"):
                    assert f"`{flag}" in table or re.search(rf"`[^`]*{re.escape(flag)}\b", table), flag


def test_the_stub_declares_every_native_field():
    tree = ast.parse((ROOT / "pymoe" / "_core.pyi").read_text())
    declared = {
        node.name: {a.target.id for a in node.body if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)}
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }
    assert declared["ModelParams"] == native_fields(_core.ModelParams())
    assert declared["OffloadParams"] == native_fields(_core.OffloadParams())


def test_model_takes_settings_and_changes(demo_gguf):
    from pymoe import Model

    with Model(demo_gguf, Settings(n_ctx=512), offload="off", n_threads=1) as m:
        assert m.n_ctx == 512 and m.settings.n_threads == 1 and not m.offload.enabled
