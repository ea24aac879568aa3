"""The `pymoe` command line, driven as a user drives it: arguments, stdin,
and a pseudo-terminal for the interactive chat."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pexpect
import pytest
from conftest import TESTS, run_pymoe


def test_help_lists_the_commands():
    proc = run_pymoe("--help")
    assert proc.returncode == 0
    for verb in ("chat", "generate", "info", "eval", "perplexity", "demo"):
        assert verb in proc.stdout
    sub = run_pymoe("generate", "--help")
    assert sub.returncode == 0 and "--temp" in sub.stdout and "--seed" in sub.stdout


def test_demo_prints_its_model_path(demo_gguf):
    proc = run_pymoe("demo", "--print-path")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(demo_gguf)
    assert "--print-path" in run_pymoe("demo", "--help").stdout


def test_generate_greedy_is_deterministic(demo_gguf):
    args = ("generate", str(demo_gguf), "-p", "The capital of France is", "-n", "16", "--temp", "0")
    a, b = run_pymoe(*args), run_pymoe(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert "Paris" in a.stdout


def test_generate_seeded_sampling_repeats(demo_gguf):
    args = ("generate", str(demo_gguf), "-p", "Once upon a time", "-n", "16", "--temp", "1", "--seed", "5")
    a, b = run_pymoe(*args), run_pymoe(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_generate_reads_stdin_and_reports_stats(demo_gguf, tmp_path):
    """--stats: the summary on stderr; --stats-json FILE: the raw counters, as JSON."""
    out = tmp_path / "stats.json"
    proc = run_pymoe(
        "generate", str(demo_gguf), "-f", "-", "-n", "4", "--temp", "0", "--offload", "off", "--stats",
        "--stats-json", str(out), input="The capital of France is",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    speed = r"^speed +prompt [\d.]+ tok/s \(5 tokens\), generation [\d.]+ tok/s \(4 tokens\)$"
    assert re.search(speed, proc.stderr, re.M)
    assert re.search(r"^experts +offload is off", proc.stderr, re.M)
    report = json.loads(out.read_text())
    assert report["offload"] is None
    assert report["generation"]["prompt_tokens"] == 5 and report["generation"]["generated_tokens"] == 4
    bad = run_pymoe("generate", str(demo_gguf), "-p", "x", "--stats-json", str(tmp_path / "no" / "s.json"))
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("verb", ["generate", "eval", "perplexity", "chat"])
def test_stats_flags_leave_the_model_to_the_positional(verb):
    """`--stats MODEL` (the flag takes no value) and `--stats=layers` in either place."""
    import importlib

    parser = importlib.import_module(f"pymoe.{'evaluate' if verb == 'eval' else verb}").setup_arg_parser()
    extra = {"generate": ["-p", "x"], "eval": ["--logits-out", "l.npy", "--text", "t.txt"]}.get(verb, [])
    for argv, view in ((["--stats", "m.gguf"], "summary"), (["m.gguf", "--stats=layers"], "layers"),
                       (["--stats=layers", "m.gguf"], "layers"), (["m.gguf"], None)):  # fmt: skip
        args = parser.parse_args([*argv, *extra])
        assert args.model == "m.gguf" and args.stats == view


def test_info_reports_experts_and_bytes(demo_gguf, dense_gguf):
    proc = run_pymoe("info", str(demo_gguf), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["n_expert"] == 8 and info["n_expert_used"] == 2 and info["moe_layers"] == 30
    assert info["expert_bytes"] + info["other_bytes"] <= info["file_size"]
    assert info["bytes_by_type"]["q4_1"]["expert"] == info["expert_bytes"]
    text = run_pymoe("info", str(demo_gguf)).stdout
    assert "8 per layer, 2 used per token" in text and "q4_1" in text
    dense = run_pymoe("info", str(dense_gguf))
    assert dense.returncode == 0 and "no experts to offload" in dense.stdout


def test_perplexity(demo_gguf, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The cat sat on the mat. The dog sat on the rug. " * 30)
    proc = run_pymoe("perplexity", str(demo_gguf), "-f", str(f), "--chunk", "128", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n_chunks"] >= 2 and 1.0 < res["perplexity"] < 20.0


# --- bad input: one clear line on stderr, exit code != 0, no traceback


def _bad_inputs(tmp_path, demo_gguf):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, I am not a model\n")
    truncated = tmp_path / "truncated.gguf"
    with open(demo_gguf, "rb") as src:
        truncated.write_bytes(src.read(3_000_000))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF\x03\x00\x00\x00")
    return {
        "missing": (["generate", str(tmp_path / "nope.gguf"), "-p", "x"], "does not exist"),
        "directory": (["generate", str(tmp_path), "-p", "x"], "is a directory"),
        "not gguf": (["generate", str(not_gguf), "-p", "x"], "not a GGUF file"),
        "truncated": (["generate", str(truncated), "-p", "x"], "truncated"),
        "header only": (["info", str(header_only)], "not a valid GGUF"),
        "truncated info": (["info", str(truncated)], "truncated"),
        "bad flag": (["generate", str(demo_gguf), "-p", "x", "--no-such-flag"], "unrecognized arguments"),
        "bad number": (["generate", str(demo_gguf), "-p", "x", "-n", "many"], "invalid int value"),
        "bad command": (["fly"], "invalid choice"),
        "bad tokens": (
            ["eval", str(demo_gguf), "--tokens", str(not_gguf), "--logits-out", str(tmp_path / "o.npy")],
            "integer token ids",
        ),
        "bad cache type": (["generate", str(demo_gguf), "-p", "x", "--cache-type", "f99"], "unknown ggml type"),
    }


CASES = [
    "missing",
    "directory",
    "not gguf",
    "truncated",
    "header only",
    "truncated info",
    "bad flag",
    "bad number",
    "bad command",
    "bad tokens",
    "bad cache type",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line(case, tmp_path, demo_gguf):
    args, expected = _bad_inputs(tmp_path, demo_gguf)[case]
    proc = run_pymoe(*args, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0], proc.stderr
    assert len(lines) == 1, proc.stderr
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*tmp"))


def test_verbose_shows_the_traceback(tmp_path):
    proc = run_pymoe("generate", str(tmp_path / "nope.gguf"), "-p", "x", "--verbose")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


# --- the interactive chat, in a pseudo-terminal


def _spawn_chat(model, *extra):
    env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pymoe", "chat", str(model), "--temp", "0", *extra],
        env=env,
        encoding="utf-8",
        timeout=120,
        cwd=str(TESTS),  # not the repository root: see run_pymoe
    )
    child.expect("commands:")
    banner = child.before
    child.expect("> ")
    return child, banner


def test_chat_session(demo_gguf):
    child, banner = _spawn_chat(demo_gguf, "-n", "32")
    assert "8 experts, 2 used per token" in banner
    try:
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect("> ")
        child.sendline("/stats")
        child.expect(r"speed +prompt [\d.]+ tok/s \(\d+ tokens\), generation [\d.]+ tok/s \((\d+) tokens\)")
        generated = int(child.match.group(1))
        child.expect("> ")
        child.sendline("/stats json")
        child.expect(f'"generated_tokens": {generated},')
        child.expect("> ")
        child.sendline("/stats bars")
        child.expect("unknown /stats view 'bars'; hint: /stats, /stats layers or /stats json")
        child.expect("> ")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_stops_the_answer_not_the_program(demo_gguf):
    child, _ = _spawn_chat(demo_gguf, "-n", "2000", "--ctx-size", "4096")
    try:
        child.sendline("Write a very long story about a dragon, with many chapters.")
        child.expect("chapters.")  # the terminal's echo of the line
        child.expect(r"\w+ \w+ \w+")  # the answer is streaming
        child.kill(signal.SIGINT)
        child.expect("answer stopped")
        child.expect("> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_during_a_long_prompt_stops_it_and_drops_the_message(demo_gguf):
    """Ctrl-C while a ~2.4k-token message is evaluated stops the evaluation at once (llama.cpp's
    abort callback), not after it; the message is not kept, so the next turn is short and quick."""
    child, _ = _spawn_chat(demo_gguf, "-n", "8", "-b", "16", "-t", "1", "--ctx-size", "4096", "--stats")
    try:
        child.sendline("Summarise: " + " ".join(f"w{i % 97}" for i in range(830)))  # 3.2 kB: one terminal line
        time.sleep(1.5)
        child.kill(signal.SIGINT)
        child.expect(r"\[stopped; the message was not added\]", timeout=30)
        child.expect("> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect(r"speed +prompt [\d.]+ tok/s \((\d+) tokens\)")
        assert int(child.match.group(1)) < 100  # this message alone, not the interrupted one too
        child.expect("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_with_a_dense_model_says_there_are_no_experts(dense_gguf):
    child, banner = _spawn_chat(dense_gguf)
    try:
        assert "no experts to offload" in banner
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()


def test_chat_reads_piped_stdin(demo_gguf):
    proc = run_pymoe("chat", str(demo_gguf), "--temp", "0", "-n", "24", input="What is the capital of France?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_chat_past_the_context_window(demo_gguf):
    """Past the context the oldest turns are dropped (a context shift); a single
    message longer than the context gets a clear message; no crash either way."""
    long_turn = "Tell me about the sea. " * 14
    too_long = "word " * 400
    session = "".join(f"{long_turn}\n" for _ in range(4)) + f"{too_long}\nWhat is the capital of France?\n/exit\n"
    proc = run_pymoe(
        "chat", str(demo_gguf), "--temp", "0", "-n", "12", "--ctx-size", "256", "-t", "1", input=session, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "dropped the" in proc.stderr and "oldest turn" in proc.stderr
    assert "too long for the context of 256 tokens" in proc.stderr
    assert "Paris" in proc.stdout[-300:]  # the last answer, after the refused message
