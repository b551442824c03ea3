"""Smoke test of benchmarks/llm_recovery.py: the whole comparison on a tiny byte-level LM, on CPU."""

import json
import math

import pytest
import torch

from tests.helpers import import_benchmarks


@pytest.fixture(scope="module")
def bench():
    (llm_recovery,) = import_benchmarks("llm_recovery")
    return llm_recovery


def test_tiny_scratch_run_writes_finite_rows(bench, tmp_path):
    pytest.importorskip("peft")
    argv = ["--model", "scratch", "--size", "tiny", "--scratch-steps", "3", "--steps", "4", "--seq", "16", "--batch", "2",
            "--eval-batches", "1", "--calib-batches", "1", "--seeds", "0", "1", "--sparsities", "0.5", "2:4",
            "--out", str(tmp_path), "--threads", str(torch.get_num_threads())]
    result = bench.main(argv)
    with open(tmp_path / "llm_recovery.json") as f:
        written = json.load(f)
    assert written["runs"] == json.loads(json.dumps(result["runs"]))
    assert (tmp_path / "llm_recovery.png").stat().st_size > 0
    runs = written["runs"]
    for label in ("50%", "2:4"):
        for row in bench.ALL_ROWS[1:]:
            expected = 2 if row in bench.TRAINING_ROWS else 1
            got = [r for r in runs if r["row"] == row and r["sparsity"] == label]
            assert len(got) == expected, (label, row)
            for r in got:
                assert math.isfinite(r["val"]) and math.isfinite(r["test"]) and r["val"] > 1.0
                if row == "lora":
                    assert r["sparsity_after"] < 0.05  # merging the adapters fills the pruned slots
                else:
                    assert r["sparsity_after"] == pytest.approx(0.5, abs=0.01)
                if row in bench.TRAINING_ROWS:
                    assert len(r["losses"]) == 4 and all(math.isfinite(v) for v in r["losses"])
    assert [r["row"] for r in runs if r["sparsity"] == "-"] == ["dense"]
    qresu = [r for r in runs if r["row"] == "qresu"]
    resu_rows = [r for r in runs if r["row"] == "resu"]
    # the θ phase over 4-bit codes stores less than the dense weights; RESU keeps the dense values plus a mask
    assert all(r["theta_bytes"] < r["dense_bytes"] for r in qresu)
    assert all(r["theta_bytes"] > r["dense_bytes"] for r in resu_rows)


def test_bad_sparsity_is_refused(bench):
    with pytest.raises(SystemExit, match="--sparsities"):
        bench.parse_sparsity("1.5")
