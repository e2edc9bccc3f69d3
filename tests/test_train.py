"""Floor 7: the training loop (history, schedule, evaluation), exact resume from a checkpoint,
the NaN stop, checkpoint and history files, atomic writes, and the evaluation helpers."""
import csv
import math
import os

import numpy as np
import pytest

from lora_numpy import Tensor, backend
from lora_numpy import io as lio
from lora_numpy.checkpoint import load_model, save_model
from lora_numpy.data import ArithmeticTask, SumClassificationTask
from lora_numpy.evaluate import classification_metrics, exact_match_accuracy
from lora_numpy.models import GPT, GPTConfig, GPTForSequenceClassification, GPTForTokenClassification
from lora_numpy.nn import Linear, Module
from lora_numpy.optim import SGD, AdamW, cosine_schedule, param_groups_for_weight_decay, set_lr
from lora_numpy.train import TrainConfig, TrainingDiverged, save_history_csv, train

TINY = dict(vocab_size=15, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny(**overrides):
    return GPTConfig(**{**TINY, **overrides})


def _np(a):
    return backend.to_numpy(a)


def lm_batch(rng):
    """Random next-token data for the tiny GPT (drawn from the loop's own generator)."""
    seq = rng.integers(0, TINY["vocab_size"], size=(4, 13))
    return seq[:, :-1], seq[:, 1:]


def params_of(model):
    return {k: _np(v).copy() for k, v in model.state_dict().items()}


def file_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


class Regression(Module):
    """y = x Wᵀ + b with a mean-squared loss: every weight gets a non-zero gradient."""

    def __init__(self, seed=0):
        self.lin = Linear(3, 2, rng=np.random.default_rng(seed))

    def forward(self, x, y):
        out = self.lin(Tensor(x))
        return out, ((out - Tensor(y)) ** 2).mean()


def regression_batch(rng):
    x = rng.standard_normal((8, 3)).astype(np.float32)
    return x, (x @ np.array([[1.0, -2.0, 0.5], [0.3, 0.0, 1.0]], dtype=np.float32).T)


# ---- history, evaluation, schedule -------------------------------------------------------------
def test_history_records_every_step_with_evals_and_schedule():
    """Each step has step/loss/lr/grad_norm/ms; eval metrics appear every eval_every steps and
    at the last step only; the lr is cosine_schedule's value (min_lr = lr/10 by default)."""
    config = TrainConfig(steps=7, batch_size=8, lr=0.05, warmup_steps=2, eval_every=3)
    calls = []

    def eval_fn(model):
        calls.append(model.training)
        return {"val": float(len(calls))}
    history = train(Regression(), regression_batch, config, eval_fn=eval_fn, progress=False)
    assert [r["step"] for r in history] == list(range(1, 8))
    for r in history:
        assert {"step", "loss", "lr", "grad_norm", "ms"} <= set(r)
        assert math.isfinite(r["loss"]) and r["grad_norm"] >= 0 and r["ms"] >= 0
        assert r["lr"] == pytest.approx(cosine_schedule(r["step"] - 1, 7, 0.05, 2, 0.005), abs=0)
    assert [r["step"] for r in history if "val" in r] == [3, 6, 7]
    assert [r["val"] for r in history if "val" in r] == [1.0, 2.0, 3.0]
    assert calls == [False, False, False]  # evaluation runs in eval mode
    assert history[-1]["lr"] != history[2]["lr"]


def test_eval_every_zero_evaluates_only_at_the_end():
    """eval_every=0 runs eval_fn once, at the last step."""
    history = train(Regression(), regression_batch,
                    TrainConfig(steps=4, batch_size=8, lr=0.01, warmup_steps=0, eval_every=0),
                    eval_fn=lambda m: {"val": 1.0}, progress=False)
    assert [r["step"] for r in history if "val" in r] == [4]


def test_first_step_uses_the_scheduled_lr_and_reports_the_grad_norm():
    """AdamW's first step moves each weight by lr·g/(|g|+eps) ≈ lr (no decay, no clipping), so
    the change shows the lr really applied; grad_norm is the global norm of the gradients."""
    model = Regression(seed=1)
    batch = regression_batch(np.random.default_rng(0))  # the loop's data_rng uses seed 0
    _, loss = model(*batch)
    loss.backward()
    norm = math.sqrt(sum(float((_np(p.grad).astype(np.float64) ** 2).sum())
                         for p in model.parameters()))
    grads = [_np(p.grad).copy() for p in model.parameters()]
    model.zero_grad()
    before = [_np(p.data).copy() for p in model.parameters()]
    config = TrainConfig(steps=10, batch_size=8, lr=0.04, warmup_steps=4, weight_decay=0.0,
                         grad_clip=0.0)
    history = train(model, regression_batch, config, stop_at=1, progress=False)
    assert len(history) == 1
    assert history[0]["grad_norm"] == pytest.approx(norm, rel=1e-5)
    lr0 = cosine_schedule(0, 10, 0.04, 4, 0.004)
    assert history[0]["lr"] == lr0
    for p, b, g in zip(model.parameters(), before, grads):
        np.testing.assert_allclose(b - _np(p.data), lr0 * np.sign(g), rtol=1e-3, atol=1e-7)


# ---- exact resume ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [6])
def test_resume_is_exact(tmp_path, n):
    """Stopping at N/2 and resuming into a freshly built model (other seed: its weights and
    dropout state come only from the checkpoint) continues bit for bit: the same losses for
    steps N/2+1..N and the same final parameters as one uninterrupted run (dropout 0.1)."""
    config = tiny(dropout=0.1)
    tc = TrainConfig(steps=n, batch_size=4, lr=1e-2, warmup_steps=2, seed=5)

    full_model = GPT(config, seed=0)
    full = train(full_model, lm_batch, tc, checkpoint_dir=tmp_path / "full", progress=False)

    first = train(GPT(config, seed=0), lm_batch, tc, checkpoint_dir=tmp_path / "split",
                  stop_at=n // 2, progress=False)
    assert [r["step"] for r in first] == list(range(1, n // 2 + 1))
    assert [r["loss"] for r in first] == [r["loss"] for r in full[: n // 2]]

    fresh = GPT(config, seed=123)
    rest = train(fresh, lm_batch, tc, checkpoint_dir=tmp_path / "split", resume=True,
                 progress=False)
    assert [r["step"] for r in rest] == list(range(1, n + 1))
    assert [r["loss"] for r in rest[n // 2:]] == [r["loss"] for r in full[n // 2:]]
    final, expected = params_of(fresh), params_of(full_model)
    assert list(final) == list(expected)
    for k in expected:
        np.testing.assert_array_equal(final[k], expected[k])


def test_resume_without_restoring_dropout_state_would_differ(tmp_path):
    """Control for the resume test: dropout masks matter, so two runs whose dropout generators
    start differently have different losses (the exact match above is not automatic)."""
    config = tiny(dropout=0.1)
    tc = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, seed=5)
    a = train(GPT(config, seed=0), lm_batch, tc, progress=False)
    model = GPT(config, seed=0)
    model.dropout_rng.random(10)  # move the dropout generator on
    b = train(model, lm_batch, tc, progress=False)
    assert [r["loss"] for r in a] != [r["loss"] for r in b]


def test_resume_refuses_a_changed_config_unless_overridden(tmp_path):
    """A resumed run under another config is refused, naming each changed field; with
    override_config=True it continues from the saved step under the new config (here: a longer
    run and no weight decay), and the optimizer uses the new settings, not the saved ones."""
    tc = TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=1, weight_decay=0.1)
    train(Regression(), regression_batch, tc, checkpoint_dir=tmp_path, progress=False)
    longer = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"steps: saved 4, now 6; weight_decay: saved 0.1, now 0.0"):
        train(Regression(), regression_batch, longer, checkpoint_dir=tmp_path, resume=True,
              progress=False)
    seen = []

    def loss_recording_weight_decay(model, batch):
        seen.append([g["weight_decay"] for g in optimizer.param_groups])
        return model(*batch)[1]
    model = Regression()
    optimizer = AdamW(param_groups_for_weight_decay(model.named_parameters(), 0.0), lr=1e-2)
    history = train(model, regression_batch, longer, loss_fn=loss_recording_weight_decay,
                    checkpoint_dir=tmp_path, resume=True, override_config=True,
                    optimizer=optimizer, progress=False)
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert seen == [[0.0, 0.0], [0.0, 0.0]]  # steps 5, 6: the new settings (saved: [0.1, 0.0])


def test_resume_at_the_end_changes_nothing_and_past_it_is_refused(tmp_path):
    """Resuming a finished run returns its history and leaves its files byte for byte; asking
    to stop before the saved step is refused rather than saving the run as an earlier step."""
    tc = TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=0)
    history = train(Regression(), regression_batch, tc, checkpoint_dir=tmp_path, progress=False)
    saved = file_bytes(tmp_path)
    again = train(Regression(), regression_batch, tc, checkpoint_dir=tmp_path, resume=True,
                  progress=False)
    assert again == history and file_bytes(tmp_path) == saved
    with pytest.raises(ValueError, match="at step 3, past the requested end 2"):
        train(Regression(), regression_batch, tc, checkpoint_dir=tmp_path, resume=True,
              stop_at=2, progress=False)
    assert file_bytes(tmp_path) == saved


def lora_plus_like(model):
    """Two groups at different rates, as LoRA+ builds them (B at 16x A's rate)."""
    return SGD([{"params": [model.lin.weight], "lr": 0.01},
                {"params": [model.lin.bias], "lr": 0.16}], lr=0.01)


def test_a_callers_optimizer_keeps_its_group_ratios_under_the_schedule(tmp_path):
    """With optimizer=, the schedule scales each group's own lr: the ratio 16 holds at every
    step, the group at config.lr gets exactly the scheduled lr, and a resumed run (its own
    optimizer rebuilt by the caller) equals an uninterrupted one."""
    tc = TrainConfig(steps=6, batch_size=8, lr=0.01, warmup_steps=2)
    lrs = []

    def run(model, optimizer, **kwargs):
        def loss_fn(m, batch):
            lrs.append([g["lr"] for g in optimizer.param_groups])
            return m(*batch)[1]
        return train(model, regression_batch, tc, loss_fn=loss_fn, optimizer=optimizer,
                     progress=False, **kwargs)
    model = Regression()
    history = run(model, lora_plus_like(model))
    assert [a for a, _ in lrs] == [r["lr"] for r in history]
    for a, b in lrs:
        assert b == pytest.approx(16 * a, rel=1e-12)
    split = Regression()
    run(split, lora_plus_like(split), checkpoint_dir=tmp_path, stop_at=3)
    resumed = Regression(seed=5)
    run(resumed, lora_plus_like(resumed), checkpoint_dir=tmp_path, resume=True)
    for k, v in params_of(model).items():
        np.testing.assert_array_equal(params_of(resumed)[k], v)


def test_set_lr_takes_one_rate_or_one_per_group():
    model = Regression()
    optimizer = lora_plus_like(model)
    set_lr(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]
    set_lr(optimizer, [0.1, 1.6])
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 1.6]
    with pytest.raises(ValueError, match="1 learning rates for 2"):
        set_lr(optimizer, [0.1])


# ---- divergence ----------------------------------------------------------------------------------
def test_nan_loss_raises_and_leaves_the_checkpoint_untouched(tmp_path):
    """A NaN loss raises TrainingDiverged naming the step, and a checkpoint folder that held a
    good checkpoint holds the same bytes afterwards."""
    ckpt = tmp_path / "ckpt"
    tc = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=0)
    model = GPT(tiny(), seed=0)
    train(model, lm_batch, tc, checkpoint_dir=ckpt, progress=False)
    saved = file_bytes(ckpt)
    assert {"model.npz", "optimizer.npz", "train_state.json"} <= set(saved)
    calls = []

    def nan_on_third_step(model, batch):
        calls.append(1)
        loss = model(*batch)[1]
        return loss * float("nan") if len(calls) == 3 else loss
    with pytest.raises(TrainingDiverged, match=r"step 3\b"):
        train(model, lm_batch, tc, loss_fn=nan_on_third_step, checkpoint_dir=ckpt, progress=False)
    assert file_bytes(ckpt) == saved


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_lr_diverges_with_a_named_step(tmp_path):
    """An absurd learning rate makes the loss non-finite: TrainingDiverged, not a silent NaN
    history or a saved broken checkpoint."""
    ckpt = tmp_path / "ckpt"
    model = Regression()
    train(model, regression_batch, TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=0),
          checkpoint_dir=ckpt, progress=False)
    saved = file_bytes(ckpt)
    tc = TrainConfig(steps=50, batch_size=8, lr=1e30, warmup_steps=0, weight_decay=0.0,
                     grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match=r"at step \d+"):
        train(model, regression_batch, tc, checkpoint_dir=ckpt, progress=False)
    assert file_bytes(ckpt) == saved


# ---- model files ---------------------------------------------------------------------------------
def _perturbed(model, seed=9):
    """Move every weight away from its seed-0 init, so a loader that rebuilds from the config
    without reading the arrays would be caught."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = p.data + backend.asarray(0.05 * rng.standard_normal(p.shape).astype(p.dtype))
    return model


def test_save_and_load_gpt(tmp_path):
    """save_model/load_model round-trips a GPT: same config, same arrays, same outputs; the npz
    loads without pickle; extras are kept in config.json."""
    model = _perturbed(GPT(tiny(n_layer=1), seed=3))
    save_model(tmp_path, model, extra={"task": "demo"})
    with np.load(tmp_path / "model.npz", allow_pickle=False) as npz:
        assert set(npz.files) == set(model.state_dict())
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(npz[k], _np(v))
    loaded, meta = load_model(tmp_path)
    assert type(loaded) is GPT and loaded.config == model.config
    assert meta["task"] == "demo"
    x = np.random.default_rng(0).integers(0, 15, size=(2, 9))
    np.testing.assert_array_equal(_np(loaded(x)[0].data), _np(model(x)[0].data))


def test_save_and_load_classifier(tmp_path):
    """The round trip works for GPTForSequenceClassification too (num_labels and score head)."""
    model = _perturbed(GPTForSequenceClassification(tiny(n_layer=1), num_labels=4,
                                                    seed=2))
    save_model(tmp_path, model)
    with np.load(tmp_path / "model.npz", allow_pickle=False) as npz:
        assert "score.weight" in npz.files
    loaded, meta = load_model(tmp_path)
    assert type(loaded) is GPTForSequenceClassification and loaded.num_labels == 4
    x = np.random.default_rng(0).integers(0, 15, size=(3, 7))
    lengths = np.array([7, 2, 5])
    np.testing.assert_array_equal(_np(loaded(x, lengths)[0].data), _np(model(x, lengths)[0].data))


def test_save_model_refuses_nan_and_keeps_old_files(tmp_path):
    """A model holding NaN is not saved (ValueError naming the parameter) and the files of the
    last good save are untouched."""
    model = GPT(tiny(n_layer=1), seed=0)
    save_model(tmp_path, model)
    saved = file_bytes(tmp_path)
    model.blocks[0].mlp.fc1.weight.data[0, 0] = np.nan
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight"):
        save_model(tmp_path, model)
    assert file_bytes(tmp_path) == saved


def test_save_arrays_is_atomic(tmp_path, monkeypatch):
    """If writing fails halfway, the old file is intact and no temporary file is left."""
    path = tmp_path / "arrays.npz"
    lio.save_arrays(path, {"a": np.arange(5.0)})
    old = path.read_bytes()
    real_savez = np.savez

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")  # start writing, then fail
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        lio.save_arrays(path, {"a": np.zeros(100)})
    monkeypatch.setattr(np, "savez", real_savez)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["arrays.npz"]
    np.testing.assert_array_equal(lio.load_arrays(path)["a"], np.arange(5.0))
    lio.save_arrays(path, {"b": np.ones(3)})  # a successful write replaces the file
    assert set(lio.load_arrays(path)) == {"b"}
    assert os.listdir(tmp_path) == ["arrays.npz"]


def test_save_history_csv(tmp_path):
    """One CSV row per step; eval columns are filled on eval steps and empty elsewhere."""
    history = train(Regression(), regression_batch,
                    TrainConfig(steps=5, batch_size=8, lr=0.01, warmup_steps=1, eval_every=2),
                    eval_fn=lambda m: {"val_loss": 0.5, "acc": 0.25}, progress=False)
    path = save_history_csv(history, tmp_path / "sub" / "history.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert {"step", "loss", "lr", "grad_norm", "ms", "val_loss", "acc"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["val_loss"] for r in rows] == ["", "0.5", "", "0.5", "0.5"]
    assert [r["acc"] != "" for r in rows] == [False, True, False, True, True]
    for r, h in zip(rows, history):
        assert float(r["loss"]) == h["loss"]


# ---- evaluation ----------------------------------------------------------------------------------
def test_exact_match_accuracy_on_a_tiny_untrained_model():
    """exact_match_accuracy returns a float in [0, 1] for a real (untrained) GPT."""
    task = ArithmeticTask(op="+", n_digits=1, test_fraction=0.2, seed=0)
    model = GPT(tiny(), seed=0)
    acc = exact_match_accuracy(model, task, limit=10)
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0


class AnswerStub:
    """A stand-in model whose greedy generation writes the task's stored answer after each
    prompt, except for the prompts listed in ``wrong``."""

    def __init__(self, task, split, wrong=()):
        prompts, answers = task.examples(split)
        self.table = {tuple(p): a for p, a in zip(prompts.tolist(), answers)}
        self.wrong = {tuple(w) for w in wrong}

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, rng=None):
        assert temperature == 0
        rows = []
        for p in np.asarray(idx).tolist():
            answer = self.table[tuple(p)][:max_new_tokens].copy()
            if tuple(p) in self.wrong:
                answer[0] = (answer[0] + 1) % 10
            rows.append(np.concatenate([p, answer]))
        return np.array(rows)


def test_exact_match_accuracy_with_a_perfect_stub():
    """A model that always writes the right answer scores 1.0; one wrong digit in one of N
    answers scores (N-1)/N."""
    task = ArithmeticTask(op="+", n_digits=2, test_fraction=0.05, seed=0)
    prompts, _ = task.examples("test")
    assert exact_match_accuracy(AnswerStub(task, "test"), task) == 1.0
    n = len(prompts)
    stub = AnswerStub(task, "test", wrong=[prompts[3].tolist()])
    assert exact_match_accuracy(stub, task) == pytest.approx((n - 1) / n)
    assert exact_match_accuracy(stub, task, limit=3) == 1.0


def test_classification_metrics_report_keys():
    """classification_metrics on a tiny classifier returns the full report."""
    task = SumClassificationTask(n_digits=1, boundaries=(6, 12), test_fraction=0.3, seed=0)
    model = GPTForSequenceClassification(tiny(), num_labels=task.n_classes, seed=0)
    report = classification_metrics(model, task)
    assert {"accuracy", "precision", "recall", "f1", "support", "macro_precision",
            "macro_recall", "macro_f1"} <= set(report)
    assert 0.0 <= report["accuracy"] <= 1.0
    assert len(report["precision"]) == task.n_classes
    assert sum(report["support"]) == len(task.examples("test")[2])
    assert report["support"] == task.class_counts("test").tolist()


@pytest.mark.parametrize("make", [lambda: GPT(tiny(), seed=3),
                                  lambda: GPTForSequenceClassification(tiny(), 3, seed=3),
                                  lambda: GPTForTokenClassification(tiny(causal=False), 5, seed=3)],
                         ids=["GPT", "sequence-classifier", "token-classifier-encoder"])
def test_every_model_kind_round_trips_through_a_checkpoint(make, tmp_path):
    model = make()
    save_model(tmp_path / "ckpt", model)
    loaded, _ = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 7))
    np.testing.assert_array_equal(_np(loaded(ids)[0].data), _np(model(ids)[0].data))
