"""`pymoe info --expert-budget`: the engine's memory, predicted from the header
with nothing loaded, is what the engine allocates (over two RPC devices:
tests/test_rpc.py)."""

from __future__ import annotations

import pytest
from conftest import run_pymoe

import pymoe
from pymoe.info import layer_devices, memory_plan


@pytest.fixture(scope="module")
def with_sidecar(tiny, tmp_path_factory):
    from pymoe.convert import convert

    out = tmp_path_factory.mktemp("info-sidecar")
    convert(str(tiny.checkpoint("mixtral")), out / "m.gguf", outtype="q8_0", expert_type="q8_0", lo_type="q4_0")
    return out / "m.gguf"


@pytest.mark.parametrize("sidecar", [None, "auto"])
def test_memory_plan_is_what_the_engine_allocates(with_sidecar, sidecar):
    settings = pymoe.Settings(
        offload="on", expert_budget=0.5, prefetch=True, sidecar=sidecar, lo_share=0.3, n_threads=1, n_ctx=128,
        n_batch=64,
    )  # fmt: skip
    plan = memory_plan(str(with_sidecar), settings)
    with pymoe.Model(with_sidecar, settings) as m:
        m.logits(list(range(8, 30)))
        got = m.offload_stats(raw=True)
    assert got["pool_bytes"] + got["pool_bytes_lo"] == plan["allocated"] == plan["host"]["pool_bytes"] > 0
    assert (got["pool_bytes_lo"] > 0) == (sidecar is not None)
    assert plan["devices"] == []  # no GPU here: every pool in host memory
    assert plan["host"]["ids_bytes"] == got["ids_bytes"] > 0
    assert plan["host"]["read_buffer_bytes"] == got["bounce_bytes"] > 0
    assert plan["host"]["router_copy_bytes"] == got["router_copy_bytes"]  # f32 routers are read in place: 0
    total = plan["host"]["ids_bytes"] + plan["host"]["read_buffer_bytes"] + plan["host"]["router_copy_bytes"]
    assert plan["overhead_bytes"] == total


def test_layer_split_follows_free_memory():
    """llama.cpp's default split: the last n_gpu_layers layers (the output layer counted), cut in
    proportion to free memory."""
    two = [{"free": 3 << 30}, {"free": 1 << 30}]
    assert layer_devices(4, 0, two) == [None] * 4
    assert layer_devices(7, 99, two) == [0, 0, 0, 0, 0, 0, 1]  # 8 layers with the output: 6 and 2
    assert layer_devices(7, 4, two) == [None, None, None, None, 0, 0, 0]  # output + last 3 layers on the GPUs
    assert layer_devices(3, -1, [{"free": 1}]) == [0, 0, 0]


def test_info_prints_the_engine_memory(demo_gguf):
    proc = run_pymoe("info", str(demo_gguf), "--expert-budget", "0.5", "--prefetch")
    assert proc.returncode == 0, proc.stderr
    assert "120 of 240 experts (50%)" in proc.stdout
    # 4 io threads + 2 loaders (8 MiB + 8 KiB each) and the stream's ring: 16 x 548 KiB (a projection of
    # one expert, 540 KiB, plus alignment)
    assert "engine memory" in proc.stdout and "read buffers 56.61 MiB" in proc.stdout
    bad = run_pymoe("info", str(demo_gguf), "--expert-budget", "lots")
    assert bad.returncode != 0 and "lots" in bad.stderr
