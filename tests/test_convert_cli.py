"""`pymoe convert` as a user runs it: outputs and sidecars, the sidecar of a
GGUF we did not write, refusals (mismatched sidecar, existing outputs,
unknown architectures, unmapped tensors, missing experts), interruption,
and hub access from the local cache while offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import TESTS, run_pymoe
from hf_models import build_checkpoint

from pymoe import Model, _core
from pymoe.convert import ProgressEvent, build_sidecar, convert
from pymoe.sidecar import KEY_FINGERPRINT, check_sidecar, default_sidecar_path, fingerprint


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("olmoe", tmp_path_factory.mktemp("ck") / "olmoe", wide=True)


def test_cli_writes_main_and_sidecar(ckpt, tmp_path):
    out = tmp_path / "olmoe.gguf"
    proc = run_pymoe("convert", str(ckpt), "-o", str(out), "--expert-type", "Q4_K", "--outtype", "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and f"wrote {tmp_path / 'olmoe.lo.gguf'}" in proc.stdout
    info = check_sidecar(out, tmp_path / "olmoe.lo.gguf")
    assert info.lo_type == "q2_K" and info.n_expert == 8 and len(info.tensors) == 12
    with Model(out) as m:
        assert m.summary.is_moe and m.metadata["general.architecture"] == "olmoe"
    assert leftovers(tmp_path) == []


def test_cli_shows_progress_bars_on_a_terminal(ckpt, tmp_path):
    import pexpect

    out = tmp_path / "bars.gguf"
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pymoe", "convert", str(ckpt), "-o", str(out)],
        cwd=str(TESTS),
        encoding="utf-8",
        timeout=120,
    )
    text = child.read()
    child.close()
    assert child.exitstatus == 0, text
    assert "tensors" in text and "quantising" in text and "51/51" in text


def test_cli_no_sidecar_and_types(ckpt, tmp_path):
    out = tmp_path / "x.gguf"
    proc = run_pymoe("convert", str(ckpt), "-o", str(out), "--no-sidecar", "--outtype", "bf16", "--expert-type", "q5_k")
    assert proc.returncode == 0, proc.stderr
    assert not default_sidecar_path(out).exists()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_up_exps.weight"] == "Q5_K" and types["blk.0.attn_q.weight"] == "BF16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    bad = run_pymoe("convert", str(ckpt), "-o", str(tmp_path / "y.gguf"), "--expert-type", "q9_z")
    assert bad.returncode == 1 and "--expert-type 'q9_z'" in bad.stderr and "q4_K" in bad.stderr


def test_sidecar_of_a_gguf_we_did_not_write(tiny, tmp_path):
    """llama.cpp's converter made this file; the sidecar binds to it without touching it."""
    main = tmp_path / "upstream.gguf"
    shutil.copy(tiny.gguf("mixtral", "q8_0"), main)
    before = sha256(main)
    proc = run_pymoe("convert", str(main), "--lo-type", "q4_0")
    assert proc.returncode == 0, proc.stderr
    side = tmp_path / "upstream.lo.gguf"
    assert f"wrote {side}" in proc.stdout
    assert sha256(main) == before
    info = check_sidecar(main, side)
    assert info.lo_type == "q4_0" and {t.main_type for t in info.tensors} == {"q8_0"}
    # each expert: ggml's dequantisation of the main file's bytes, quantised again
    r_main = {t.name: t for t in gguf.GGUFReader(main).tensors}
    t = next(t for t in info.tensors if t.name == "blk.1.ffn_gate_exps.weight")
    n_in = t.shape[0]
    hi = np.asarray(r_main[t.name].data).reshape(-1, _core.row_size("q8_0", n_in))
    expected = _core.quantize(_core.dequantize(hi, "q8_0", n_in), "q4_0")
    with open(side, "rb") as f:
        f.seek(t.offset)
        got = np.frombuffer(f.read(t.nbytes), dtype=np.uint8)
    np.testing.assert_array_equal(got, expected.reshape(-1))
    # an expert's bytes are where the layout says
    off, n = t.expert_range(3)
    assert n * 8 == t.nbytes and off == t.offset + 3 * n


def test_sidecar_only_refuses_what_it_cannot_do(tiny, dense_gguf, tmp_path):
    main = tiny.gguf("qwen3_moe")
    proc = run_pymoe("convert", str(main), "-o", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1 and "--sidecar" in proc.stderr
    proc = run_pymoe("convert", str(main), "--sidecar", str(main), "--force")
    assert proc.returncode == 1 and "is also an input" in proc.stderr
    proc = run_pymoe("convert", str(dense_gguf), "--sidecar", str(tmp_path / "d.lo.gguf"))
    assert proc.returncode == 1 and "no routed-expert tensors" in proc.stderr
    assert not (tmp_path / "d.lo.gguf").exists()


def test_mismatched_sidecar_is_refused(ckpt, tiny, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert(ckpt, a)
    convert(tiny.checkpoint("olmoe"), b)  # same architecture, another model
    check_sidecar(a, default_sidecar_path(a))
    with pytest.raises(ValueError, match="belongs to another main file"):
        check_sidecar(b, default_sidecar_path(a))
    # a main file changed after the sidecar was made: its metadata ...
    edited = tmp_path / "edited.gguf"
    data = bytearray(a.read_bytes())
    at = data.find(b"q4_K")  # pymoe.convert.expert_type's value
    data[at : at + 4] = b"q4_k"
    edited.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="belongs to another main file"):
        check_sidecar(edited, default_sidecar_path(a))
    # ... or one of its tensors
    header = _core.read_gguf(str(a), 0)
    t = next(t for t in header["tensors"] if t["name"] == "blk.2.ffn_down_exps.weight")
    data = bytearray(a.read_bytes())
    data[t["offset"]] ^= 0xFF
    edited.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="belongs to another main file"):
        check_sidecar(edited, default_sidecar_path(a))
    # a file that is not a sidecar at all
    with pytest.raises(ValueError, match="not a pymoe expert sidecar"):
        check_sidecar(a, b)
    assert fingerprint(a) == gguf.GGUFReader(default_sidecar_path(a)).get_field(KEY_FINGERPRINT).contents()


def test_existing_outputs_need_force(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    assert run_pymoe("convert", str(ckpt), "-o", str(out)).returncode == 0
    side = default_sidecar_path(out)
    stamps = (sha256(out), sha256(side))
    again = run_pymoe("convert", str(ckpt), "-o", str(out), "--expert-type", "q8_0")
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert (sha256(out), sha256(side)) == stamps
    # only the sidecar left over: still refused, and the main file is not written either
    out.unlink()
    proc = run_pymoe("convert", str(ckpt), "-o", str(out))
    assert proc.returncode == 1 and str(side) in proc.stderr and not out.exists()
    forced = run_pymoe("convert", str(ckpt), "-o", str(out), "--expert-type", "q8_0", "--force")
    assert forced.returncode == 0, forced.stderr
    assert sha256(side) != stamps[1] and "q8_0" in {t.tensor_type.name.lower() for t in gguf.GGUFReader(out).tensors}
    check_sidecar(out, side)
    # never over an input, even with --force
    proc = run_pymoe("convert", str(ckpt), "-o", str(ckpt / "model.safetensors"), "--force")
    assert proc.returncode == 1 and "is also an input" in proc.stderr
    assert leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_no_output(ckpt, tmp_path):
    out = tmp_path / "i.gguf"
    seen: list[ProgressEvent] = []

    def stop_after_a_few(ev: ProgressEvent) -> None:
        seen.append(ev)
        if len(seen) == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, out, progress=stop_after_a_few)
    assert not out.exists() and not default_sidecar_path(out).exists()
    assert list(tmp_path.iterdir()) == []
    # the same run, not interrupted: progress reaches the end
    done: list[ProgressEvent] = []
    convert(ckpt, out, progress=done.append)
    assert done[-1].bytes_done == done[-1].bytes_total and done[-1].tensor_done
    assert sum(ev.tensor_done for ev in done) == done[-1].n_tensors


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~100 MB of bf16 experts: a conversion that takes long enough to interrupt."""
    overrides = {"hidden_size": 512, "intermediate_size": 1024, "num_local_experts": 8, "num_hidden_layers": 6}
    return build_checkpoint(
        "mixtral", tmp_path_factory.mktemp("big") / "mixtral", dtype="bfloat16", overrides=overrides
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_cli_killed_mid_conversion_leaves_no_output(big_ckpt, tmp_path, sig):
    out = tmp_path / "k.gguf"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pymoe", "convert", str(big_ckpt), "-o", str(out), "-t", "1", "--expert-type", "q2_K"],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leftovers(tmp_path), "the conversion finished before it could be interrupted"
    time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert not out.exists() and not default_sidecar_path(out).exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert leftovers(tmp_path) == []  # temporary files removed too
    else:
        assert proc.returncode == -signal.SIGKILL  # only hidden temporaries can remain


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_unknown_architecture_lists_the_supported_ones(ckpt, tmp_path):
    bad = tmp_path / "llama"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    proc = run_pymoe("convert", str(bad), "-o", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1
    assert "LlamaForCausalLM" in proc.stderr and "MixtralForCausalLM" in proc.stderr
    assert "DeepseekV3ForCausalLM" in proc.stderr and "GptOssForCausalLM" in proc.stderr
    assert list(tmp_path.glob("*.gguf")) == []


def test_unmapped_tensor_is_named(ckpt, tmp_path):
    def add(t):
        t["model.layers.1.mlp.mystery.weight"] = np.zeros((4, 4), np.float32)

    bad = _edit_checkpoint(ckpt, tmp_path / "bad", add)
    proc = run_pymoe("convert", str(bad), "-o", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1 and "'model.layers.1.mlp.mystery.weight'" in proc.stderr
    assert list(tmp_path.glob("*.gguf")) == []


def test_missing_expert_is_named(ckpt, tmp_path):
    def drop(t):
        del t["model.layers.2.mlp.experts.5.up_proj.weight"]

    bad = _edit_checkpoint(ckpt, tmp_path / "bad", drop)
    proc = run_pymoe("convert", str(bad), "-o", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1 and "'model.layers.2.mlp.experts.5.up_proj.weight' is missing" in proc.stderr
    assert list(tmp_path.glob("*.gguf")) == []


def _offline(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "pymoe", "convert", *args],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hub_repo_from_the_local_cache_offline(ckpt, tmp_path):
    # the layout huggingface-hub keeps: models--owner--name/{refs/main, snapshots/<commit>/...}
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--olmoe"
    shutil.copytree(ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "hub.gguf"
    proc = _offline(tmp_path / "hub", "tiny/olmoe", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert gguf.GGUFReader(out).get_field("pymoe.convert.source").contents() == "tiny/olmoe"
    missing = _offline(tmp_path / "hub", "tiny/absent", "-o", str(tmp_path / "none.gguf"))
    assert missing.returncode == 1
    assert "'tiny/absent' is not in the hub cache" in missing.stderr and "offline" in missing.stderr
    assert "hf download tiny/absent" in missing.stderr
    local = _offline(
        tmp_path / "hub", "tiny/absent", "--local-dir", str(tmp_path / "dl"), "-o", str(tmp_path / "n.gguf")
    )
    assert local.returncode == 1 and "--local-dir" in local.stderr and "hf download" in local.stderr


def test_not_a_model_folder(tmp_path):
    proc = run_pymoe("convert", str(tmp_path), "-o", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1 and "config.json" in proc.stderr
    proc = run_pymoe("convert", "no/such/path/at/all", "-o", str(tmp_path / "x.gguf"))
    assert proc.returncode == 1 and "neither a folder nor a hub repo id" in proc.stderr


def test_build_sidecar_api_progress(tiny, tmp_path):
    main = tmp_path / "m.gguf"
    shutil.copy(tiny.gguf("qwen2_moe"), main)
    events: list[ProgressEvent] = []
    result = build_sidecar(main, lo_type="Q8_0", progress=events.append)
    assert result.sidecar == tmp_path / "m.lo.gguf"
    assert events[-1].bytes_done == events[-1].bytes_total and events[-1].n_tensors == 12
    check_sidecar(main, result.sidecar)
