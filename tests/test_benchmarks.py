"""benchmarks/train_step.py runs, and the figures it writes add up.

The benchmark prints timings and never passes or fails on them; these tests only check that it
runs end to end (tiny size, one timed step) and that the JSON it writes is consistent: a step's
products at the peak plus the rest is the step, and the ratios are the quotients of the times.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run_train_step(tmp_path, *extra):
    out = tmp_path / "train_step.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--sizes",
                    "tiny", "--warmup", "0", "--steps", "1", "--json", str(out), *extra],
                   check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.read_text())


def test_train_step_without_torch_splits_the_step(tmp_path):
    result = run_train_step(tmp_path, "--no-torch")
    (row,) = result["sizes"]
    assert "torch" not in row and result["meta"]["torch_matmul_peak_flops"] is None
    step = row["lora_numpy"]["step"]
    assert row["products_at_peak_ms"] == pytest.approx(
        1000 * row["matmul_flops"] / result["meta"]["matmul_peak_flops"])
    assert row["products_at_peak_ms"] + row["rest_ms"] == pytest.approx(step)
    assert row["lora/full"]["step"] == pytest.approx(row["LoRA np"]["step"] / step)


def test_train_step_against_torch_gives_both_splits(tmp_path):
    pytest.importorskip("torch")
    result = run_train_step(tmp_path)
    (row,) = result["sizes"]
    torch_step = row["torch"]["step"]
    assert row["ratio"]["step"] == pytest.approx(row["lora_numpy"]["step"] / torch_step)
    assert row["torch_products_at_peak_ms"] + row["torch_rest_ms"] == pytest.approx(torch_step)
    assert row["rest_for_goal_ms"] == pytest.approx(0.85 * torch_step - row["products_at_peak_ms"])
    # the same initial weights and batch: the first losses agree (the table's own check)
    assert row["lora_numpy"]["first_loss"] == pytest.approx(row["torch"]["first_loss"], rel=1e-5)


def test_robustness_finds_one_and_two_threads_bit_identical(tmp_path):
    """benchmarks/robustness.py at a toy size: the two thread counts' runs are the same bits, so
    their verdict lines are the same lines (the README shows the default job's)."""
    out = tmp_path / "robustness.json"
    printed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "robustness.py"), "--no-kernel", "--out", str(tmp_path),
         "--json", str(out), "--", "--steps", "6", "--base-steps", "10", "--n-embd", "16", "--n-head", "2",
         "--n-layer", "1", "--batch-size", "8", "--seeds", "0", "1", "--methods", "full", "lora"],
        check=True, capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out.read_text())
    assert list(result) == ["1 thread", "2 threads"]
    two = result["2 threads"]
    assert two["against_first"]["identical"] and two["against_first"]["verdicts_identical"]
    assert two["verdicts"] == result["1 thread"]["verdicts"] and len(two["verdicts"]) >= 3
    assert "runs bit-identical" in printed and "verdict lines identical" in printed
