"""tools/quality_mixed_precision.py end to end on the tiny random Mixtral: its random-model study, and
the checks it makes on its own figures. (The measuring itself, perplexity against a saved reference,
is the library's: tests/test_perplexity.py.)"""

from __future__ import annotations

import pytest
from conftest import load_tool

THRESHOLDS = "0.3,0.5,1.01"


@pytest.fixture(scope="module")
def tool():
    return load_tool("quality_mixed_precision")


def test_random_study_measures_share_agreement_and_kl(tool, tiny, tmp_path):
    argv = ["--random-archs", "mixtral", "--random-lo-types", "q2_K", "--thresholds", THRESHOLDS]
    args = tool.setup_arg_parser().parse_args([*argv, "--random-seqs", "2", "--random-len", "24", "--jobs", "1"])
    ckpt = tiny.checkpoint("mixtral")
    report = {"random": tool.study_random(args, tmp_path, tmp_path, lambda _msg: None, {"mixtral": ckpt})}
    entry = report["random"]["archs"]["mixtral"]
    # 128-value rows do not fit q2_K's 256-blocks: every projection falls back to q4_0
    assert entry["sidecars"]["q2_K"]["effective"] == {"gate": "q4_0", "up": "q4_0", "down": "q4_0"}
    # what the tool checks on every run: the reference is exact and uses no low pair; the low share is
    # 1/2 at 0.5 (top-2: the smaller weight is below 0.5, the larger not) and 1 at 1.01, non-decreasing,
    # and within 0.03 of the share transformers' own router gives
    checks = tool.run_checks(report)
    assert [c["check"] for c in checks] == [
        "mixtral q2_K: threshold 0 equals offload=off",
        "mixtral q2_K: threshold 0 uses no low pair",
        "mixtral q2_K: share 1/2 at 0.5, 1 above 1",
        "mixtral q2_K: share non-decreasing",
        "mixtral q2_K: share within 0.03 of transformers' router",
    ]
    assert all(c["ok"] for c in checks), checks
    # and what it reports besides
    t = entry["types"]["q2_K"]
    off = t["offload_off_check"]
    assert off["kl_mean"] == 0.0 and off["top1_agreement"] == 1.0
    assert [r["threshold"] for r in t["sweep"]] == [0.3, 0.5, 1.01]
    for r in t["sweep"]:
        assert r["kl_mean"] > 0.0 and not r["exact"] and r["lo_share_of_pairs"] > 0.0
