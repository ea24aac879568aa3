"""The GPU tier without a GPU: ggml's RPC backend as the device.

`pymoe rpc-server` serves this build's patched CPU backend on loopback; the
models run in child processes (tests/rpc_child.py) with every layer and every
expert slot on that device, whose memory is reachable only through the backend
API, as a GPU's is. Offloading must change no logits there either."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TESTS, run_pymoe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pymoe", "rpc-server", "--port", str(port), "-t", "1"],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"rpc-server exited: {proc.stdout.read() if proc.stdout else ''}") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("rpc-server did not start listening")


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=30)  # reaps it and closes its pipe


@pytest.fixture(scope="module")
def rpc() -> Iterator[str]:
    port = _free_port()
    proc = start_server(port)
    yield f"127.0.0.1:{port}"
    stop_server(proc)


def run_child(tmp_path: Path, model: Path, tokens: list[int], runs: dict, decode: int = 0) -> tuple[dict, dict]:
    spec = tmp_path / "spec.json"
    out = tmp_path / "out.npz"
    spec.write_text(json.dumps({"model": str(model), "tokens": tokens, "runs": runs, "decode": decode}))
    proc = subprocess.run(
        [sys.executable, str(TESTS / "rpc_child.py"), str(spec), str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=TESTS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    arrays = dict(np.load(out))
    return arrays, json.loads(Path(str(out) + ".json").read_text())


def _tokens(n: int, vocab: int = 256, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


BASE = {"cache_type": "f32", "repack": False, "n_gpu_layers": 99, "n_threads": 1}


def test_offload_on_an_rpc_device_changes_no_logits(tiny, rpc, tmp_path):
    """Every layer on the RPC device: with the engine on, at budgets 0, 0.3 and 1.0, LRU and multidim,
    with prefetching and with the default CPU assist (misses computed on the CPU, admitted in the
    background), the logits equal those of the engine off on the same placement, bit for bit."""
    model = tiny.gguf("mixtral")
    tokens = _tokens(40)
    on = {**BASE, "rpc": [rpc], "offload": "on"}
    runs = {
        "off": {**BASE, "rpc": [rpc], "offload": "off"},
        "b0": {**on, "expert_budget": 0.0},
        "b03_lru": {**on, "expert_budget": 0.3},
        "b03_multidim": {**on, "expert_budget": 0.3, "policy": "multidim"},
        "b1_load": {**on, "expert_budget": 1.0, "cpu_assist": False},
        "b03_prefetch": {**on, "expert_budget": 0.3, "prefetch": True},
    }
    arrays, report = run_child(tmp_path, model, tokens, runs, decode=16)
    for name in runs:
        if name == "off":
            continue
        for mode in ("batch", "decode"):
            np.testing.assert_array_equal(arrays[f"{name}.{mode}"], arrays[f"off.{mode}"], err_msg=f"{name} {mode}")
    # the pools and their ids live on the device, the experts on the host
    assert report["b03_lru"]["tier"] == "host"
    assert any(buf.startswith("RPC") and size > 0 for buf, size in report["b03_lru"]["pools_by_buffer"])
    assert "RPC0" in report["off"]["devices"] or any(d.startswith("RPC") for d in report["off"]["devices"])
    # both branches ran: pairs from device slots and pairs on the CPU
    for name in ("b03_lru", "b03_multidim", "b03_prefetch"):
        assert report[name]["pool_pairs"] > 0 and report[name]["direct_pairs"] > 0, (name, report[name])
    assert report["b0"]["pool_pairs"] == 0 and report["b1_load"]["direct_pairs"] == 0
    # the cache filled in the background while misses were computed on the CPU
    assert report["b03_lru"]["admissions"] > 0 and report["b03_lru"]["hits"] > 0


def test_sidecar_on_an_rpc_device(mixtral_with_sidecar_rpc, rpc, tmp_path):
    """With a sidecar: threshold 0 is exact; every pair low computes the low copy, as the model
    converted with low-type experts does on the same device."""
    main, side, q4 = mixtral_with_sidecar_rpc
    tokens = _tokens(32, seed=5)
    on = {**BASE, "rpc": [rpc], "offload": "on", "sidecar": str(side), "cpu_assist": False}
    runs = {
        "off": {**BASE, "rpc": [rpc], "offload": "off"},
        "thr0": {**on, "expert_budget": 0.5, "lo_threshold": 0.0},
        "all_lo": {**on, "expert_budget": 1.0, "lo_share": 1.0, "lo_threshold": 1.01},
    }
    arrays, report = run_child(tmp_path, main, tokens, runs)
    np.testing.assert_array_equal(arrays["thr0.batch"], arrays["off.batch"])
    q4_arrays, _ = run_child(tmp_path, q4, tokens, {"off": {**BASE, "rpc": [rpc], "offload": "off"}})
    np.testing.assert_allclose(arrays["all_lo.batch"], q4_arrays["off.batch"], rtol=0, atol=1e-4)
    assert report["all_lo"]["lo_pairs"] == report["all_lo"]["pairs"] > 0


@pytest.fixture(scope="module")
def mixtral_with_sidecar_rpc(tiny, tmp_path_factory):
    from pymoe.convert import convert

    out = tmp_path_factory.mktemp("sidecar-rpc")
    ckpt = tiny.checkpoint("mixtral")
    convert(str(ckpt), out / "main.gguf", outtype="f32", expert_type="f32", lo_type="q4_0")
    convert(str(ckpt), out / "q4.gguf", outtype="f32", expert_type="q4_0", lo_type="q4_0")
    return out / "main.gguf", out / "main.lo.gguf", out / "q4.gguf"


def test_stats_show_both_branches(demo_gguf, rpc, tmp_path):
    """`--stats` on a model on the RPC device: pairs from device slots and pairs on the CPU."""
    proc = run_pymoe(
        "generate", str(demo_gguf), "-p", "Once upon a time", "-n", "24", "--temp", "0", "--rpc", rpc,
        "-ngl", "99", "-t", "1", "--offload", "on", "--expert-budget", "0.3", "--stats",
        "--stats-json", str(tmp_path / "stats.json"), timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    offload = json.loads((tmp_path / "stats.json").read_text())["offload"]
    assert offload["tier"] == "host"
    assert offload["pool_pairs"] > 0 and offload["direct_pairs"] > 0 and offload["admissions"] > 0
    # the summary: the slots on the device, the CPU's share, the background uploads, the link's speed
    assert re.search(rf"slots on RPC\d*\[{re.escape(rpc)}\] [\d.]+ MiB", proc.stderr)
    cpu = offload["direct_pairs"] / offload["pairs"]
    assert re.search(rf"^computed +\d+% of pairs from slots, {cpu:.0%} on the CPU$", proc.stderr, re.M)
    assert f"admission    {offload['admissions']} missed experts uploaded in the background" in proc.stderr
    assert re.search(r"^calibration +link [\d.]+ [KMG]iB/s, CPU ", proc.stderr, re.M)


def test_unreachable_server_is_a_clear_error(demo_gguf):
    proc = run_pymoe("generate", str(demo_gguf), "-p", "hi", "-n", "2", "--rpc", f"127.0.0.1:{_free_port()}")
    assert proc.returncode == 1
    assert "cannot connect to the RPC server" in proc.stderr and "pymoe rpc-server" in proc.stderr
    proc = run_pymoe("generate", str(demo_gguf), "-p", "hi", "-n", "2", "--rpc", "nohost")
    assert proc.returncode == 1 and "HOST:PORT" in proc.stderr


def test_server_killed_mid_generation_is_a_clear_error_not_a_hang(demo_gguf):
    port = _free_port()
    server = start_server(port)
    try:
        client = subprocess.Popen(
            [sys.executable, "-m", "pymoe", "generate", str(demo_gguf), "-p", "Once upon a time", "-n", "4000",
             "--temp", "0", "--rpc", f"127.0.0.1:{port}", "-ngl", "99", "-t", "1",
             "--offload", "on", "--expert-budget", "0.3", "-c", "4096"],
            cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdout is not None
        client.stdout.read(8)  # it is generating
        stop_server(server)
        t0 = time.monotonic()
        _, err = client.communicate(timeout=120)
        assert time.monotonic() - t0 < 60
        assert client.returncode != 0
        assert "lost the connection to the RPC server" in err and "pymoe rpc-server" in err
    finally:
        if server.poll() is None:
            stop_server(server)


def test_info_predicts_the_engine_memory_on_two_devices(tiny, rpc, tmp_path):
    """`pymoe info --expert-budget` over two RPC servers: the layer split, each device's slot bytes and
    every figure of the engine's own memory (ids, read buffers, router copies) are what the engine
    allocates when it loads the model with the same settings."""
    port = _free_port()
    second = start_server(port)
    try:
        on = {**BASE, "rpc": [rpc, f"127.0.0.1:{port}"], "offload": "on", "expert_budget": 0.5, "prefetch": True}
        _, report = run_child(tmp_path, tiny.gguf("mixtral"), _tokens(24), {"two": on}, decode=4)
    finally:
        stop_server(second)
    got, plan = report["two"], report["two"]["plan"]
    by_endpoint = {d["endpoint"]: d for d in plan["devices"]}
    assert set(by_endpoint) == set(on["rpc"]) and all(d["layers"] for d in by_endpoint.values())
    for buf, size in got["pools_by_buffer"]:
        endpoint = buf[buf.index("[") + 1 : buf.index("]")]
        assert by_endpoint[endpoint]["pool_bytes"] == size, (buf, plan["devices"])
    assert sum(d["pool_bytes"] for d in plan["devices"]) == got["pool_bytes"]
    assert sum(d["ids_bytes"] for d in plan["devices"]) + plan["host"]["ids_bytes"] == got["ids_bytes"]
    assert plan["host"]["read_buffer_bytes"] == got["bounce_bytes"]
    assert plan["host"]["router_copy_bytes"] == got["router_copy_bytes"] > 0  # the routers live on the devices
