"""The named tasks and the default pretraining recipe."""
import numpy as np
import pytest

from lora_numpy.recipes import TASK_NAMES, make_task, pretrain


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


def test_tasks_share_one_vocabulary_and_evaluate():
    tasks = [make_task(name) for name in TASK_NAMES if name != "text"]
    assert len({t.data.tokenizer.chars for t in tasks}) == 1  # one base model serves them all
    rng = np.random.default_rng(0)
    for task in tasks:
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
