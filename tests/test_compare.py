"""Floors 8-9: the main job, ``python -m lora_numpy compare``, and the ``pretrain`` command, run
end to end through ``lora_numpy.cli.main`` with tiny sizes and few steps."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_numpy.checkpoint import load_model
from lora_numpy.cli import main
from lora_numpy.experiments.methods import LR_GRID
from lora_numpy.io import load_arrays
from lora_numpy.models import GPTForSequenceClassification

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("full", "lora", "pissa")
D, LAYERS, R, STEPS, SEEDS = 16, 1, 8, 20, (0, 1)
FAST = ["--steps", str(STEPS), "--base-steps", "30", "--n-embd", str(D),
        "--n-head", "2", "--n-layer", str(LAYERS), "--batch-size", "16", "--eval-every", "10",
        "--rank", str(R), "--seeds", *map(str, SEEDS), "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One base-model cache shared by the runs of this file (each pretrains at most once)."""
    return tmp_path_factory.mktemp("cache")


def _lora_trainable(extra=0):
    """all-linear on a GPT: q, k, v, out (d -> d) and fc1, fc2 (d <-> 4d), r(d_in + d_out) each."""
    return LAYERS * (4 * R * (D + D) + 2 * R * (D + 4 * D)) + extra


def _load_results(out):
    return json.loads((out / "results.json").read_text())


def test_compare_end_to_end(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert main(["compare", *FAST, "--out", str(out), "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out

    results = _load_results(out)
    assert results["target_metric"] == "accuracy" and results["config"]["target"] == "absdiff"
    assert set(results["source_before"]) == {"add", "sub"}  # the base knows two skills
    summaries = results["summaries"]
    assert [s["method"] for s in summaries] == list(METHODS)
    runs = results["runs"]
    assert [(r["method"], r["seed"], r["base"]) for r in runs] == [(m, s, s) for m in METHODS for s in SEEDS]
    assert sorted(results["bases"], key=int) == [str(s) for s in SEEDS]  # each run's base, by its seed
    for summary in summaries:
        lr = summary["lr"]
        assert len(lr["grid"]) == len(lr["scores"]) == len(LR_GRID) and lr["chosen"] in lr["grid"]
        assert all(len(scores) == len(SEEDS) for scores in lr["scores"])  # each rate scored on every base
        assert lr["chosen"] == lr["grid"][int(np.argmax([np.mean(s) for s in lr["scores"]]))]
        assert f"{lr['chosen']:g}" in printed
        own = [r for r in runs if r["method"] == summary["method"]]
        assert all(r["lr"] == lr["chosen"] for r in own)
        target = summary["target"]
        assert target["n"] == len(SEEDS)
        assert target["mean"] == pytest.approx(np.mean([r["target_after"] for r in own]))
        assert target["min"] == min(r["target_after"] for r in own)
        for skill in ("add", "sub"):
            assert summary["source"][skill]["max"] == max(r["source_after"][skill] for r in own)
        assert (summary["source_adapter_off"] is None) == (summary["method"] == "full")
        assert summary["memory"]["optimizer_state"] == 8 * summary["trainable_params"]  # AdamW m, v
    full, lora, pissa = summaries
    assert full["trainable_params"] == full["all_params"]
    assert lora["trainable_params"] == pissa["trainable_params"] == _lora_trainable()
    assert lora["all_params"] == full["all_params"] + _lora_trainable()
    assert lora["file_bytes"] < full["file_bytes"]
    adapter = load_file(out / "lora" / "adapter" / "adapter_model.safetensors")
    assert sum(a.size for a in adapter.values()) == lora["trainable_params"]

    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for method in METHODS:
        for seed in SEEDS:
            steps = [int(r["step"]) for r in rows if r["method"] == method and int(r["seed"]) == seed]
            assert steps == list(range(0, STEPS + 1))  # step 0: the metric before training

    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["learning_vs_forgetting.png", "loss_curves.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
        assert png.name in printed
    table = [line.split() for line in printed.splitlines()]
    for method in METHODS:
        assert any(cells and cells[0] == method for cells in table), method
    assert "seeds [0, 1]" in printed and ("no difference" in printed or "higher" in printed)
    assert "paired over the 2 (base, seed) pairs" in printed

    # a second run finds the cached bases and gives the same LoRA results
    out2 = tmp_path / "again"
    assert main(["compare", *FAST, "--methods", "lora", "--out", str(out2), "--cache", str(cache)]) == 0
    printed2 = capsys.readouterr().out
    assert "0 of 2 bases to pretrain" in printed2
    assert len([p for p in cache.iterdir() if p.name.startswith("base-add+sub")]) == len(SEEDS)
    timeless = lambda rs: [{k: v for k, v in r.items() if k != "ms_per_step"} for r in rs]
    assert timeless(_load_results(out2)["runs"]) == timeless(r for r in runs if r["method"] == "lora")


def test_the_base_cache_key_changes_with_every_base_setting(monkeypatch):
    from dataclasses import replace
    from lora_numpy import parallel
    from lora_numpy.experiments import CompareConfig
    from lora_numpy.experiments.bases import base_settings
    from lora_numpy.recipes import ModelSize
    d = CompareConfig()
    variants = [replace(d, source="add,mul"), replace(d, base_steps=d.base_steps + 1),
                replace(d, size=ModelSize(n_layer=3)), replace(d, train=replace(d.train, batch_size=32))]
    keys = [base_settings(c, 0) for c in [d, *variants]] + [base_settings(d, 1)]  # the seed, too
    assert all(keys[0] != k for k in keys[1:])
    # another machine's arithmetic (here: BLAS's kernel) is another base
    monkeypatch.setattr(parallel, "blas_core", lambda: "another kernel")
    assert base_settings(d, 0) != keys[0]
    monkeypatch.undo()
    # fine-tuning settings do not change the base
    assert base_settings(replace(d, seeds=(5,), lr_grid={"full": (1e-3,)}, train=replace(d.train, steps=300, warmup_steps=30)), 0) == keys[0]


def test_compare_classification_trains_the_score_head(tmp_path, cache, capsys):
    out = tmp_path / "sum"
    assert main(["compare", *FAST, "--target", "sum", "--out", str(out), "--cache", str(cache)]) == 0
    capsys.readouterr()
    results = _load_results(out)
    summaries = {s["method"]: s for s in results["summaries"]}
    assert set(summaries) == set(METHODS)
    (base_dir,) = [p for p in cache.iterdir() if p.name.startswith("base-add+sub") and "-s0-" in p.name]
    body, _ = load_model(base_dir)
    n_classes = 3
    # the head every method starts from: a fresh GPTForSequenceClassification's, seed 0
    initial_score = GPTForSequenceClassification(body.config, n_classes, 0).score.weight.numpy()
    for method, summary in summaries.items():
        if method == "full":
            saved = load_arrays(out / method / "model" / "model.npz")["score.weight"]
        else:  # PEFT's key: the adapter trains the head through modules_to_save
            saved = load_file(out / method / "adapter" / "adapter_model.safetensors")["base_model.model.score.weight"]
        assert saved.shape == initial_score.shape == (n_classes, D)
    for run in results["runs"]:
        assert 0 <= run["target_after"] <= 1
    assert summaries["lora"]["trainable_params"] == _lora_trainable(extra=n_classes * D)
    assert summaries["pissa"]["trainable_params"] == _lora_trainable(extra=n_classes * D)


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
    (["compare", "--source", "add,nope"], "nope"),
    (["compare", "--study", "everything"], "everything"),
    (["compare", "--methods", "lora", "glora"], "glora"),
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
    assert main(["compare", "--source", "add,sub", "--target", "sub", "--out", str(out),
                 "--cache", str(cache), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and "sub" in err
    assert "Traceback" not in err
    assert not out.exists() and not cache.exists()


def test_rank_and_lowdata_studies_from_the_command_line(tmp_path, cache, capsys):
    tiny = list(FAST)
    tiny[tiny.index("--seeds") + 1:tiny.index("--seeds") + 1 + len(SEEDS)] = ["0"]  # one seed
    out = tmp_path / "studies"
    assert main(["compare", *tiny, "--study", "rank", "--out", str(out), "--cache", str(cache)]) == 0
    rank = json.loads((out / "rank" / "results.json").read_text())
    assert rank["ranks"] == [1, 2, 4, 8, 16]  # 64 > the model's width 16: skipped
    assert [(row["r"], row["method"]) for row in rank["by_rank"]] == \
        [(r, m) for m in ("lora", "pissa") for r in (1, 2, 4, 8, 16)]
    assert [row["trainable_params"] for row in rank["by_rank"][:5]] == \
        [LAYERS * (4 * r * 2 * D + 2 * r * 5 * D) for r in (1, 2, 4, 8, 16)]
    assert (out / "rank" / "rank_study.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["compare", *tiny, "--study", "lowdata", "--out", str(out), "--cache", str(cache)]) == 0
    low = _load_results(out / "lowdata")
    assert low["config"]["max_train"] == 300
    assert "300 training examples" in capsys.readouterr().out


def test_compare_runs_dora_loraplus_qlora_qpissa(tmp_path, cache, capsys, monkeypatch):
    """The newer registry entries through the command line: each finishes; QLoRA and QPiSSA hold
    a smaller frozen base than LoRA (4-bit Linear weights); LoRA+ trains with B at 16x A's lr;
    DoRA's adapter file holds its magnitude vectors."""
    import lora_numpy.experiments.runner as runner
    import lora_numpy.experiments.side_by_side as side_by_side
    from lora_numpy.experiments.methods import LORAPLUS_LR_RATIO
    real_train, optimizers = side_by_side.train, []

    def recording_train(model, batch_fn, config, optimizer=None, **kwargs):
        if optimizer is not None:  # each group's lr and the kind of parameters it holds
            names = {id(p): n for n, p in model.named_parameters()}
            optimizers.append((config.lr, [(g["lr"], {"lora_A" if "lora_A" in names[id(p)] else
                                                       "lora_B" if "lora_B" in names[id(p)] else "other"
                                                       for p in g["params"]}) for g in optimizer.param_groups]))
        return real_train(model, batch_fn, config, optimizer=optimizer, **kwargs)
    monkeypatch.setattr(side_by_side, "train", recording_train)
    monkeypatch.setattr(runner, "workers", lambda: 1)  # the recording must happen in this process
    tiny = list(FAST)
    tiny[tiny.index("--seeds") + 1:tiny.index("--seeds") + 1 + len(SEEDS)] = ["0"]  # one seed
    tiny[tiny.index("--steps") + 1] = "6"
    new = ("dora", "loraplus", "qlora", "qpissa")
    out = tmp_path / "new"
    assert main(["compare", *tiny, "--methods", "lora", *new, "--out", str(out), "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    summaries = {s["method"]: s for s in _load_results(out)["summaries"]}
    assert list(summaries) == ["lora", *new]

    frozen = {m: s["memory"]["params_frozen"] for m, s in summaries.items()}
    linear_weights = LAYERS * (4 * D * D + 2 * 4 * D * D)
    for method in ("qlora", "qpissa"):  # 4 bytes -> ~0.52 bytes per Linear weight
        assert frozen["lora"] - frozen[method] > 3.4 * linear_weights, (method, frozen)
        assert frozen[method] > frozen["lora"] - 4 * linear_weights + linear_weights / 2  # codes counted
        assert summaries[method]["trainable_params"] == summaries["lora"]["trainable_params"]
        assert summaries[method]["all_params"] == summaries["lora"]["all_params"]  # 4-bit weights counted
    assert frozen["dora"] == frozen["loraplus"] == frozen["lora"]
    assert "frozen base" in printed

    assert len(optimizers) == len(LR_GRID)  # LoRA+ only: one run per grid value on the one base
    for lr, groups in optimizers:
        for group_lr, kinds in groups:
            if "lora_B" in kinds:
                assert group_lr == pytest.approx(LORAPLUS_LR_RATIO * lr) and kinds == {"lora_B"}
            if "lora_A" in kinds:
                assert group_lr == lr and kinds == {"lora_A"}
        assert {k for _, kinds in groups for k in kinds} == {"lora_A", "lora_B"}

    dora = load_file(out / "dora" / "adapter" / "adapter_model.safetensors")
    magnitudes = [k for k in dora if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 6 * LAYERS  # one per adapted Linear
    assert summaries["dora"]["trainable_params"] == summaries["lora"]["trainable_params"] + LAYERS * (5 * D + 4 * D)


def test_forgetting_and_variance_studies_from_the_command_line(tmp_path, cache, capsys):
    """--study forgetting fine-tunes on FORGETTING_TARGET and prints each skill's retention, pair
    by pair; --study variance crosses every base with every seed at the chosen rates."""
    from lora_numpy.experiments import FORGETTING_TARGET
    out = tmp_path / "studies"
    assert main(["compare", *FAST, "--study", "forgetting", "--out", str(out), "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    forget = _load_results(out / "forgetting")
    assert forget["config"]["target"] == FORGETTING_TARGET == "mul" and forget["config"]["source"] == "add,sub"
    assert "retention: a source skill's accuracy after fine-tuning / its base's before" in printed
    assert printed.count("add retained: ") == printed.count("sub retained: ") == 3  # three pairs of methods

    assert main(["compare", *FAST, "--study", "variance", "--out", str(out), "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    variance = json.loads((out / "variance" / "results.json").read_text())
    pairs = {(r["base"], r["seed"]) for r in variance["runs"]}
    assert pairs == {(b, s) for b in SEEDS for s in SEEDS}  # every base with every seed
    assert len(variance["runs"]) == len(METHODS) * len(SEEDS) ** 2
    for method in METHODS:
        assert variance["lrs"][method] in LR_GRID
        assert variance["threads"][method] == [0.0, 0.0]  # one thread and two: the same bits
        assert f"{method:>8} " in printed
