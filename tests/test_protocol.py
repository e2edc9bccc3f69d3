"""Floor 8: the fair protocol of the main job (``lora_numpy.experiments.protocol`` and the
learning-rate choice in ``compare``): the choice sees only the validation split, scores every rate
over the bases and keeps the best mean; an edge is flagged; runs are aggregated into mean, std and
min-max; methods are compared pair by pair, "higher" only with one sign and above the floor."""
from dataclasses import replace

import numpy as np
import pytest

import lora_numpy.experiments.side_by_side as compare_module
from lora_numpy.experiments import CompareConfig, Method, aggregate, choose_lr, paired_verdict, steps_to_reach
from lora_numpy.experiments.side_by_side import RunResult, fine_tune, pick_lr
from lora_numpy.tasks import Task


def test_choose_lr_keeps_the_best_mean_over_the_bases_and_reports_every_score():
    scores = {1e-3: (0.2, 0.3), 3e-3: (0.9, 0.7), 1e-2: (1.0, 0.1)}  # 1e-2 is best on one base only
    choice = choose_lr([1e-2, 1e-3, 3e-3], scores.__getitem__)
    assert choice.chosen == 3e-3
    assert choice.grid == (1e-3, 3e-3, 1e-2) and choice.scores == ((0.2, 0.3), (0.9, 0.7), (1.0, 0.1))
    assert "0.003*" in str(choice)


def test_a_tie_goes_to_the_smaller_learning_rate():
    assert choose_lr([3e-3, 1e-3, 1e-2], lambda lr: (1.0, 1.0)).chosen == 1e-3


def test_an_edge_is_flagged_and_only_a_faster_rate_can_fail():
    # the next larger rate falls under half the best score on one base: flagged, counted once
    choice = choose_lr([1e-3, 3e-3, 1e-2], {1e-3: (0.1, 0.1), 3e-3: (0.9, 0.8), 1e-2: (0.85, 0.3)}.__getitem__)
    assert choice.chosen == 3e-3 and choice.failed == (0, 0, 1)  # 1e-3 is far behind, but slower
    assert "next to a failing rate: 0.01 failed on 1 of 2 bases" in choice.edge
    # inside the grid, with a faster rate that holds up: no edge
    assert choose_lr([1e-3, 3e-3, 1e-2], {1e-3: (0.1,), 3e-3: (0.9,), 1e-2: (0.8,)}.__getitem__).edge == ""
    assert "largest" in choose_lr([1e-3, 3e-3], {1e-3: (0.1,), 3e-3: (0.9,)}.__getitem__).edge
    assert "smallest" in choose_lr([1e-3, 3e-3], {1e-3: (0.9,), 3e-3: (0.8,)}.__getitem__).edge


def _run(method, lr, seed, val, test):
    return RunResult(method, seed, seed, lr, val, False, test, test, 0.0, None, {"add": 1.0}, None, 1.0, [])


def test_pick_lr_reads_the_validation_scores_of_every_base_never_the_test_split():
    method = Method("full", None, (1e-3, 1e-2), has_adapter=False)
    cfg = CompareConfig(seeds=(0, 1))
    # validation prefers 1e-3 on both bases; the test split would prefer 1e-2
    results = {("full", 1e-3, 0): _run("full", 1e-3, 0, 0.8, 0.1), ("full", 1e-3, 1): _run("full", 1e-3, 1, 0.7, 0.1),
               ("full", 1e-2, 0): _run("full", 1e-2, 0, 0.5, 0.9), ("full", 1e-2, 1): _run("full", 1e-2, 1, 0.6, 0.9)}
    choice = pick_lr(cfg, method, results)
    assert choice.chosen == 1e-3 and choice.scores == ((0.8, 0.7), (0.5, 0.6))


def test_a_fixed_learning_rate_skips_the_grid():
    method = Method("full", None, (1.0, 2.0), has_adapter=False)
    cfg = CompareConfig(lr={"full": 5e-4})
    assert cfg.grid(method) == (5e-4,)
    choice = pick_lr(cfg, method, {})
    assert choice.chosen == 5e-4 and choice.grid == (5e-4,) and choice.scores == ()
    assert "fixed" in str(choice)
    assert CompareConfig(lr_grid={"full": (3e-2, 1e-2)}).grid(method) == (1e-2, 3e-2)  # a config's grid, sorted
    assert CompareConfig(lr_grid={"lora": (3e-2,)}).grid(method) == (1.0, 2.0)        # another method's: its own
    with pytest.raises(ValueError, match="maps a method to its rates"):
        CompareConfig(lr_grid=(1e-3, 3e-3))


def test_aggregation():
    s = aggregate([0.5, 1.0, 0.75])
    assert s.mean == pytest.approx(0.75) and s.min == 0.5 and s.max == 1.0 and s.n == 3
    assert s.std == pytest.approx(np.std([0.5, 1.0, 0.75]))
    assert str(s) == "0.750 [0.500-1.000]"
    with pytest.raises(ValueError):
        aggregate([])


def test_steps_to_reach():
    history = [{"step": 0, "acc": 0.0}, {"step": 1, "loss": 1.0}, {"step": 50, "acc": 0.5},
               {"step": 100, "acc": 0.95}, {"step": 150, "acc": 0.99}]
    assert steps_to_reach(history, "acc", 0.9) == 100
    assert steps_to_reach(history, "acc", 0.999) is None


def test_a_verdict_needs_one_sign_on_every_pair_and_the_floor_on_each():
    verdict = lambda a, b: paired_verdict("target", "full", "lora", a, b, floor=0.01).word
    assert verdict([0.9, 0.8, 0.7], [0.8, 0.7, 0.6]) == "full higher"
    assert verdict([0.8, 0.7, 0.6], [0.9, 0.8, 0.7]) == "lora higher"
    assert verdict([0.9, 0.8, 0.6], [0.8, 0.7, 0.7]) == "no difference"   # signs disagree
    assert verdict([0.9, 0.8, 0.705], [0.8, 0.7, 0.7]) == "no difference"  # one pair under the floor
    # means far apart, but carried by one pair: still no difference (a min-max overlap rule would say so too)
    assert verdict([1.0, 0.50, 0.50], [0.1, 0.51, 0.51]) == "no difference"
    steps = paired_verdict("steps to 90%", "full", "lora", [300, 300], [450, 400], floor=50, more="slower")
    assert steps.word == "lora slower" and steps.differences == (-150, -100)
    with pytest.raises(ValueError):
        paired_verdict("target", "a", "b", [1.0], [1.0, 2.0], 0.01)


def test_config_refuses_a_target_among_the_source_skills_and_repeated_seeds():
    with pytest.raises(ValueError, match="among the source skills"):
        CompareConfig(source="add,sub", target="sub")
    with pytest.raises(ValueError, match="each once"):
        CompareConfig(seeds=(0, 0))


class _FakeTask(Task):
    """A target whose score depends on the lr the model was trained at, and which records the
    splits it was asked to evaluate."""
    metric, name, skills = "accuracy", "fake", ["fake"]

    def __init__(self, objective):
        self.objective, self.splits = objective, []

    def batch_fn(self, batch_size):
        return None

    def evaluate(self, model, limit=None, split="test"):
        self.splits.append(split)
        return {"accuracy": self.objective.get(model.get("lr"), 0.0)}


def test_a_run_is_scored_on_validation_and_gets_its_methods_own_optimizer(monkeypatch):
    """fine_tune trains once at the run's rate, with Method.make_optimizer (LoRA+'s groups, say)
    built at that rate and weight decay, and its val_score is the validation split's."""
    given = []

    def fake_train(model, batch_fn, config, optimizer=None, eval_fn=None, **kwargs):
        model["lr"] = config.lr
        given.append(optimizer)
        return [{"step": config.steps, "loss": 1.0, "ms": 1.0, **eval_fn(model)}]
    target = _FakeTask({1e-3: 0.5})
    monkeypatch.setattr(compare_module, "train", fake_train)
    monkeypatch.setattr(compare_module, "prepare", lambda *args: {})
    monkeypatch.setattr(compare_module, "tasks", lambda *args: (target, target))
    own = Method("own", None, (1e-3,), has_adapter=False,
                 make_optimizer=lambda model, lr, weight_decay: ("own optimizer", lr, weight_decay))
    monkeypatch.setitem(compare_module.METHODS, "own", own)
    cfg = CompareConfig()
    cfg = replace(cfg, train=replace(cfg.train, steps=4, warmup_steps=0))
    run = fine_tune(cfg, "own", 1e-3, 0, cfg.lora)
    assert given == [("own optimizer", 1e-3, cfg.train.weight_decay)]
    assert run.val_score == 0.5 and target.splits.count("val") == 1


def test_a_run_whose_loss_becomes_nan_scores_zero_and_is_marked(monkeypatch):
    from lora_numpy.train import TrainingDiverged

    def diverging_train(*args, **kwargs):
        raise TrainingDiverged("loss became nan at step 3")
    target = _FakeTask({})
    monkeypatch.setattr(compare_module, "train", diverging_train)
    monkeypatch.setattr(compare_module, "prepare", lambda *args: {})
    monkeypatch.setattr(compare_module, "tasks", lambda *args: (target, target))
    cfg = CompareConfig()
    run = fine_tune(cfg, "full", 3e-2, 0, cfg.lora)
    assert run.diverged and run.val_score == 0.0 and run.target_after == 0.0
    assert np.isnan(run.source_after["fake"]) and run.source_adapter_off is None
    assert "val" not in target.splits  # nothing of a broken model is scored
