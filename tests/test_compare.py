"""Floors 8-9: the main job, ``python -m lora_numpy compare``, and the ``pretrain`` command, run
end to end through ``lora_numpy.cli.main`` with tiny sizes and few steps."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lora_numpy.checkpoint import load_model
from lora_numpy.cli import main
from lora_numpy.models import GPTForSequenceClassification

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("full", "lora", "pissa")
D, LAYERS, R, STEPS = 16, 1, 8, 20
FAST = ["--steps", str(STEPS), "--base-steps", "30", "--n-embd", str(D), "--n-head", "2",
        "--n-layer", str(LAYERS), "--batch-size", "16", "--eval-every", "10", "--rank", str(R),
        "--quiet"]
TABLE_KEYS = ("method", "trainable_params", "all_params", "trainable_percent", "file", "file_bytes",
              "optimizer_state_bytes", "memory", "ms_per_step", "target_before", "target_after",
              "target_metrics", "source_before", "source_after")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One base-model cache shared by the runs of this file (each pretrains at most once)."""
    return tmp_path_factory.mktemp("cache")


def _lora_trainable(extra=0):
    """all-linear on a GPT: q, k, v, out (d -> d) and fc1, fc2 (d <-> 4d), r(d_in + d_out) each."""
    return LAYERS * (4 * R * (D + D) + 2 * R * (D + 4 * D)) + extra


def _load_results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert main(["compare", *FAST, "--out", str(out), "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out

    results = _load_results(out)
    runs = results["runs"]
    assert [r["method"] for r in runs] == list(METHODS)
    assert results["target_metric"] == "accuracy"
    for run in runs:
        for key in TABLE_KEYS:
            assert key in run, key
        assert "measured_peak" in run["memory"]
        assert 0 <= run["target_after"] <= 1 and 0 <= run["source_after"] <= 1
        assert run["trainable_percent"] == pytest.approx(100 * run["trainable_params"] / run["all_params"])
        shared = out / run["file"]
        assert shared.is_file() and shared.stat().st_size == run["file_bytes"]
        assert run["optimizer_state_bytes"] == 8 * run["trainable_params"]  # AdamW m, v in float32
        with np.load(shared, allow_pickle=False) as npz:
            assert sum(npz[k].size for k in npz.files) == run["trainable_params"]
    full, lora, pissa = runs
    assert full["trainable_params"] == full["all_params"]
    assert lora["trainable_params"] == pissa["trainable_params"] == _lora_trainable()
    assert lora["all_params"] == full["all_params"] + _lora_trainable()
    assert lora["file_bytes"] < full["file_bytes"]

    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "method" in rows[0]
    for method in METHODS:
        steps = [int(r["step"]) for r in rows if r["method"] == method]
        assert steps == list(range(1, STEPS + 1))

    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
        assert png.name in printed

    table = [line.split() for line in printed.splitlines()]
    for method in METHODS:
        assert any(cells and cells[0] == method for cells in table), method
    assert f"{lora['trainable_params']:,}" in printed

    # a second run finds the cached base model and gives the same LoRA result
    out2 = tmp_path / "again"
    assert main(["compare", *FAST, "--methods", "lora", "--out", str(out2), "--cache", str(cache)]) == 0
    printed2 = capsys.readouterr().out
    assert "reusing" in printed2 and "pretraining" not in printed2
    assert len([p for p in cache.iterdir() if p.name.startswith("base-add")]) == 1
    (again,) = _load_results(out2)["runs"]
    assert again["trainable_params"] == lora["trainable_params"]
    assert again["target_after"] == lora["target_after"]
    assert again["source_after"] == lora["source_after"]


@pytest.mark.slow
def test_compare_classification_trains_the_score_head(tmp_path, cache, capsys):
    out = tmp_path / "sum"
    assert main(["compare", *FAST, "--target", "sum", "--out", str(out), "--cache", str(cache)]) == 0
    capsys.readouterr()
    results = _load_results(out)
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == set(METHODS)
    (base_dir,) = [p for p in cache.iterdir() if p.name.startswith("base-add")]
    body, _ = load_model(base_dir)
    n_classes = 3
    # the head every method starts from: a fresh GPTForSequenceClassification's, seed 0
    initial_score = GPTForSequenceClassification(body.config, n_classes, 0).score.weight.numpy()
    for method, run in runs.items():
        metrics = run["target_metrics"]
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
        assert run["target_after"] == metrics["accuracy"]
        with np.load(out / run["file"], allow_pickle=False) as npz:
            assert "score.weight" in npz.files, method
            trained = npz["score.weight"]
        assert trained.shape == initial_score.shape == (n_classes, D)
        assert not np.allclose(trained, initial_score), f"{method} did not train the score head"
    assert runs["lora"]["trainable_params"] == _lora_trainable(extra=n_classes * D)
    assert runs["pissa"]["trainable_params"] == _lora_trainable(extra=n_classes * D)


def test_pretrain_command(tmp_path, capsys):
    out = tmp_path / "base"
    argv = ["pretrain", "--steps", "30", "--out", str(out), "--n-embd", "16", "--n-head", "2",
            "--n-layer", "1", "--batch-size", "16", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("model.npz", "config.json", "history.csv"):
        assert (out / name).is_file(), name
    assert "held-out exact-match accuracy:" in printed
    model, meta = load_model(out)
    assert model.config.n_embd == 16 and model.config.n_layer == 1
    assert meta["task"] == "add"
    accuracy = meta["report"]["accuracy"]
    assert f"held-out exact-match accuracy: {accuracy:.1%}" in printed
    with open(out / "history.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 31))


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["compare", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["pretrain", "--task", "nope"], "nope"),
    (["compare", "--methods", "lora", "qlora"], "qlora"),
    (["compare", "--target", "text"], "text"),
    (["pretrain", "--steps", "many"], "many"),
    ([], "command"),
])
def test_bad_arguments_exit_nonzero_with_a_message(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "x")] if argv else argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "error" in err and needle in err
    assert not (tmp_path / "x").exists()


def test_bad_values_caught_by_the_library_exit_nonzero(tmp_path, capsys):
    """Errors found after parsing (same source and target) are a one-line message and exit 2,
    before anything is trained or written."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["compare", "--source", "add", "--target", "add", "--out", str(out),
                 "--cache", str(cache), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and "add" in err
    assert "Traceback" not in err
    assert not out.exists() and not cache.exists()
