"""Floor 8: the matched-budget study, ``python -m lora_numpy compare --study budget``: where to put a
fixed number of adapter parameters (q,v at r=16, every Linear at r=4, the MLP at a matched rank)."""
import json

import pytest

from lora_numpy.cli import main
from lora_numpy.experiments.studies import BUDGET_SETS, matched_rank
from lora_numpy.memory import ModelShape
from lora_numpy.models import GPTConfig

D, LAYERS = 16, 1
TINY = ["--steps", "20", "--base-steps", "30", "--n-embd", str(D), "--n-head", "2",
        "--n-layer", str(LAYERS), "--batch-size", "16", "--eval-every", "10", "--quiet"]


def _shape(d=D, layers=LAYERS):
    return ModelShape.from_gpt_config(GPTConfig(vocab_size=20, block_size=16, n_layer=layers, n_head=2, n_embd=d))


def test_matched_rank_is_the_closest_count():
    shape = _shape(64, 2)
    qv16 = shape.lora_parameters(16, ("q_proj", "v_proj"))
    assert qv16 == 2 * 2 * 16 * (64 + 64)                      # two d->d matrices per block
    mlp = lambda r: shape.lora_parameters(r, ("fc1", "fc2"))
    assert mlp(1) == 2 * 2 * (64 + 256)                        # fc1 d->4d, fc2 4d->d
    r = matched_rank(shape, ("fc1", "fc2"), qv16)              # 8192 / 1280 = 6.4
    assert r == 6
    assert all(abs(mlp(r) - qv16) <= abs(mlp(other) - qv16) for other in range(1, 65))
    assert matched_rank(shape, ("fc1", "fc2"), 1) == 1         # never below rank 1
    assert matched_rank(shape, ("fc1", "fc2"), mlp(3) + mlp(1) // 2) == 3   # a tie: the smaller rank


def test_budget_study_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", *TINY, "--seeds", "0", "1", "--study", "budget", "--out", str(out),
                 "--cache", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "budget" / "results.json").read_text())
    rows = results["rows"]
    assert [row["label"] for row in rows] == [s.label for s in BUDGET_SETS]
    assert [row["r"] for row in rows] == [16, 4, 6]            # MLP: 1024 / 160 = 6.4 -> 6
    assert [row["lora_alpha"] for row in rows] == [32, 8, 12]  # alpha = 2r: the scale stays 2
    per_layer = [16 * 2 * (D + D), 4 * (4 * 2 * D + 2 * 5 * D), 6 * 2 * 5 * D]
    assert [row["adapter_params"] for row in rows] == [LAYERS * n for n in per_layer]
    assert results["budget"] == rows[0]["adapter_params"]
    for row in rows:
        s = row["summary"]
        assert s["trainable_params"] == row["adapter_params"]  # the model trains exactly these
        assert s["lr"]["chosen"] in s["lr"]["grid"] and len(s["lr"]["scores"]) == len(s["lr"]["grid"])
        assert s["target"]["n"] == 2 and s["target"]["min"] <= s["target"]["mean"] <= s["target"]["max"]
        assert str(s["lr"]["chosen"]) in printed or f"{s['lr']['chosen']:g}" in printed
    assert "+12.5%" in printed and "-6.2%" in printed             # all-linear and MLP against the budget
    assert printed.count("q,v r=16 vs") == 4                      # target and retained vs the two others


def test_budget_study_refuses_a_model_narrower_than_its_rank(tmp_path, capsys):
    narrow = list(TINY)
    narrow[narrow.index("--n-embd") + 1] = "8"
    assert main(["compare", *narrow, "--study", "budget", "--out", str(tmp_path / "o"),
                 "--cache", str(tmp_path / "c")]) == 2
    assert "n-embd >= 16" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()                         # refused before pretraining
