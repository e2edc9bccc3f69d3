"""Floor 8: the fair protocol of the main job (``lora_numpy.experiments.protocol`` and the
learning-rate choice in ``compare``): the choice sees only the validation split and keeps the best
score; seeds are aggregated into mean, std and min-max; overlapping ranges mean "no difference"."""
import numpy as np
import pytest

import lora_numpy.experiments.side_by_side as compare_module
from lora_numpy.experiments import CompareConfig, Method, aggregate, choose_lr, steps_to_reach
from lora_numpy.experiments.side_by_side import pick_lr
from lora_numpy.tasks import Task


def test_choose_lr_keeps_the_best_score_and_reports_every_one():
    objective = {1e-3: 0.2, 3e-3: 0.9, 1e-2: 0.5}
    choice = choose_lr([1e-2, 1e-3, 3e-3], objective.__getitem__)
    assert choice.chosen == 3e-3
    assert choice.grid == (1e-3, 3e-3, 1e-2) and choice.scores == (0.2, 0.9, 0.5)
    assert "0.003*" in str(choice)


def test_a_tie_goes_to_the_smaller_learning_rate():
    assert choose_lr([3e-3, 1e-3], lambda lr: 1.0).chosen == 1e-3


class _FakeTask(Task):
    """A target whose score depends on the lr the model was trained at, and which records the
    splits it was asked to evaluate."""
    metric = "accuracy"

    def __init__(self, objective):
        self.objective, self.splits = objective, []

    def batch_fn(self, batch_size):
        return None

    def evaluate(self, model, limit=None, split="test"):
        self.splits.append(split)
        return {"accuracy": self.objective[model["lr"]]}


def test_the_lr_choice_trains_short_runs_and_scores_them_on_validation_only(monkeypatch):
    trained = []

    def fake_train(model, batch_fn, config, **kwargs):
        model["lr"] = config.lr
        trained.append(config.steps)
        return []
    monkeypatch.setattr(compare_module, "train", fake_train)
    monkeypatch.setattr(compare_module, "prepare", lambda *args: {})
    objective = {1e-4: 0.3, 1e-3: 0.7, 1e-2: 0.1}
    task = _FakeTask(objective)
    method = Method("fake", None, tuple(objective), has_adapter=False)
    cfg = CompareConfig(grid_steps=7)
    choice = pick_lr(method, "base", task, cfg)
    assert choice.chosen == 1e-3 and choice.scores == (0.3, 0.7, 0.1)
    assert task.splits == ["val"] * 3  # never the test split
    assert trained == [7, 7, 7]


def test_a_fixed_learning_rate_skips_the_grid(monkeypatch):
    monkeypatch.setattr(compare_module, "train", lambda *a, **k: pytest.fail("no grid run expected"))
    method = Method("full", None, (1.0, 2.0), has_adapter=False)
    choice = pick_lr(method, "base", _FakeTask({}), CompareConfig(lr={"full": 5e-4}))
    assert choice.chosen == 5e-4 and choice.grid == (5e-4,) and choice.scores == ()
    assert "fixed" in str(choice)


def test_seed_aggregation():
    s = aggregate([0.5, 1.0, 0.75])
    assert s.mean == pytest.approx(0.75) and s.min == 0.5 and s.max == 1.0 and s.n == 3
    assert s.std == pytest.approx(np.std([0.5, 1.0, 0.75]))
    assert str(s) == "0.750 [0.500-1.000]"
    assert s.overlaps(aggregate([0.9, 1.2])) and not s.overlaps(aggregate([1.1, 1.2]))
    with pytest.raises(ValueError):
        aggregate([])


def test_steps_to_reach():
    history = [{"step": 0, "acc": 0.0}, {"step": 1, "loss": 1.0}, {"step": 50, "acc": 0.5},
               {"step": 100, "acc": 0.95}, {"step": 150, "acc": 0.99}]
    assert steps_to_reach(history, "acc", 0.9) == 100
    assert steps_to_reach(history, "acc", 0.999) is None


def test_config_refuses_a_target_among_the_source_skills():
    with pytest.raises(ValueError, match="among the source skills"):
        CompareConfig(source="add,sub", target="sub")


def test_a_methods_own_optimizer_reaches_every_grid_run(monkeypatch):
    """Method.make_optimizer (LoRA+'s groups, say) is built for each run at that run's lr and
    weight decay and handed to train; a method without one leaves train its AdamW (None)."""
    given = []

    def fake_train(model, batch_fn, config, optimizer=None, **kwargs):
        model["lr"] = config.lr
        given.append(optimizer)
        return []
    monkeypatch.setattr(compare_module, "train", fake_train)
    monkeypatch.setattr(compare_module, "prepare", lambda *args: {})
    objective = {1e-3: 0.5, 1e-2: 0.4}
    own = Method("own", None, tuple(objective), has_adapter=True,
                 make_optimizer=lambda model, lr, weight_decay: ("own optimizer", lr, weight_decay))
    cfg = CompareConfig(grid_steps=3)
    pick_lr(own, "base", _FakeTask(objective), cfg)
    assert given == [("own optimizer", lr, cfg.train.weight_decay) for lr in (1e-3, 1e-2)]
    given.clear()
    pick_lr(Method("plain", None, tuple(objective), has_adapter=False), "base", _FakeTask(objective), cfg)
    assert given == [None, None]
