"""The named tasks and the default pretraining recipe."""
import numpy as np
import pytest

from lora_numpy.recipes import TASK_NAMES, TEXT_TARGETS, ModelSize, build_model, make_task, pretrain


@pytest.mark.slow
def test_default_pretraining_reaches_95_percent_on_held_out_problems(tmp_path):
    """The recipe behind `python -m lora_numpy pretrain`, with its defaults, learns 2-digit
    addition: greedy answers to problems never seen in training are exactly right >= 95%."""
    model, report = pretrain(out=tmp_path, progress=False)
    assert report["task"] == "add" and report["steps"] == 1500
    assert report["accuracy"] >= 0.95, report
    task = make_task("add")
    prompts, answers = task.data.examples("test")
    assert len(prompts) == 1000  # the held-out tenth of all 10,000 problems
    assert (tmp_path / "model.npz").is_file() and (tmp_path / "history.csv").is_file()


@pytest.mark.slow
def test_the_default_base_knows_each_source_skill(tmp_path):
    """The main job's base (`compare`'s defaults, cold cache): >= 95% held-out exact match on
    each skill of its mixture, so forgetting can be measured skill by skill."""
    from lora_numpy.checkpoint import load_model
    from lora_numpy.experiments import CompareConfig, base_model
    cfg = CompareConfig(cache=str(tmp_path))
    assert len(cfg.source.split(",")) >= 2 and cfg.target not in cfg.source.split(",")
    model, meta = load_model(base_model(cfg, progress=False))
    report = meta["report"]
    scores = make_task(cfg.source).evaluate(model)  # the whole test split of each skill
    for skill in cfg.source.split(","):
        assert scores[f"accuracy_{skill}"] >= 0.95, scores
        assert report[f"accuracy_{skill}"] == scores[f"accuracy_{skill}"]
    assert make_task(cfg.target).evaluate(model)["accuracy"] < 0.1  # the target is new to it


def test_a_mixture_reports_each_skill():
    task = make_task("add,sub")
    assert task.skills == ["add", "sub"] and task.block_size == 9
    model = build_model(task, ModelSize(1, 2, 16))
    scores = task.evaluate(model, limit=20, split="val")
    assert set(scores) == {"accuracy", "accuracy_add", "accuracy_sub"}
    assert scores["accuracy"] == pytest.approx((scores["accuracy_add"] + scores["accuracy_sub"]) / 2)
    with pytest.raises(ValueError, match="distinct arithmetic skills"):
        make_task("add,text")


def test_low_data_tasks_keep_the_same_validation_and_test_splits():
    full, few = make_task("absdiff"), make_task("absdiff", max_train=300)
    assert len(few.data.operands("train")) == 300
    for split in ("val", "test"):
        np.testing.assert_array_equal(full.data.operands(split), few.data.operands(split))


def test_tasks_share_one_vocabulary_per_base_and_evaluate():
    text = ("causal", "mlm", *TEXT_TARGETS)
    for group in ([n for n in TASK_NAMES if n not in ("text", *text)], text):
        tasks = [make_task(name) for name in group]
        assert len({t.data.tokenizer.chars for t in tasks}) == 1  # one base model serves them all
    rng = np.random.default_rng(0)
    for task in (make_task(name) for name in TASK_NAMES if name != "text"):
        batch = task.batch_fn(4)(rng)
        assert batch[0].shape[0] == 4 and batch[0].shape[1] <= task.block_size


def test_text_task_reads_a_users_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello lora " * 200, encoding="utf-8")
    task = make_task("text", str(path))
    x, y = task.batch_fn(2)(np.random.default_rng(0))
    assert x.shape == (2, task.block_size)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_unknown_task_and_classification_pretraining_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope")
    with pytest.raises(ValueError, match="fine-tuning task"):
        pretrain("sum", steps=1, progress=False)
