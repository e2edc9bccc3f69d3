"""Floors 8-9: ``compare --target ner|translate|docs`` and ``pretrain --task mlm``, end to end
through ``lora_numpy.cli.main`` at tiny sizes (a few seconds each)."""
import json

import pytest

from lora_numpy.checkpoint import load_model
from lora_numpy.cli import main
from lora_numpy.experiments import CompareConfig, config_for
from lora_numpy.experiments.bases import base_settings

METHODS = ("full", "lora", "pissa")
SEEDS = (0, 1)
TINY = ["--steps", "6", "--base-steps", "5", "--n-layer", "1", "--n-head", "2",
        "--n-embd", "16", "--batch-size", "8", "--seeds", *map(str, SEEDS), "--quiet"]
HEADLINE = {"ner": "entity_f1", "translate": "chrf", "docs": "macro_f1"}
ALSO = {"ner": ("token_accuracy", "entity_precision", "entity_recall"), "translate": ("exact_match",),
        "docs": ("accuracy", "precision", "recall")}
BASE = {"ner": "mlm", "translate": "causal", "docs": "causal"}
HEAD = {"ner": "classifier", "translate": None, "docs": "score"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One base cache for the file: the mlm encoder and the causal decoder each pretrain once."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("target", ["ner", "translate", "docs"])
def test_compare_text_target_end_to_end(target, tmp_path, cache, capsys):
    out = tmp_path / target
    assert main(["compare", "--target", target, *TINY, "--out", str(out), "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["target_metric"] == HEADLINE[target]
    assert results["config"]["source"] == BASE[target] and results["source_metric"] == "val_loss"
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {(m, s) for m in METHODS for s in SEEDS}  # every method, every seed
    for (method, _), run in runs.items():
        assert run["metrics"][HEADLINE[target]] == run["target_after"]
        assert all(k in run["metrics"] for k in ALSO[target])
        assert set(run["source_after"]) == {BASE[target]}          # the base's held-out text loss
        assert (run["source_adapter_off"] is None) == (method == "full")
    # LoRA trains r(d_in + d_out) per adapted Linear of the block (q, k, v, out: 16 -> 16; fc1, fc2:
    # 16 <-> 64), and the task's new head in full (modules_to_save); a language model's lm_head stays frozen
    adapters = 8 * (4 * (16 + 16) + 2 * (16 + 64))
    lora = next(s for s in results["summaries"] if s["method"] == "lora")
    assert (lora["trainable_params"] == adapters) == (HEAD[target] is None)
    assert lora["trainable_params"] >= adapters
    saved = json.loads((out / "lora" / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == (None if HEAD[target] is None else [HEAD[target]])
    assert f"{HEADLINE[target]} at end" in printed and "held-out text val_loss" in printed


def test_pretrain_mlm_saves_an_encoder(tmp_path, capsys):
    out = tmp_path / "mlm"
    assert main(["pretrain", "--task", "mlm", "--steps", "5", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                 "--batch-size", "8", "--out", str(out), "--quiet"]) == 0
    model, meta = load_model(out)
    assert model.config.causal is False and meta["tokenizer"]["mask_token"]
    assert "encoder" in capsys.readouterr().out


def test_text_targets_check_their_base_and_key_every_setting():
    with pytest.raises(ValueError, match="pretrained on text"):
        CompareConfig(source="add,sub", target="ner")
    with pytest.raises(ValueError, match="causal"):
        CompareConfig(source="mlm", target="translate")  # generation needs a decoder
    assert CompareConfig(target="ner", source="causal").source == "causal"  # a decoder on NER is allowed
    encoder, decoder = base_settings(config_for("ner"), 0), base_settings(config_for("docs"), 0)
    assert encoder["causal"] is False and decoder["causal"] is True
    assert encoder["text_sha256"] == decoder["text_sha256"] and encoder["block_size"] == decoder["block_size"]
