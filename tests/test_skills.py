"""Floor 2: what the side-by-side experiment adds to the tasks: a validation split carved from
training (the test split unchanged), the distance skill "|", and batches mixing several skills."""
import numpy as np
import pytest

from lora_numpy.data import IGNORE_INDEX, ArithmeticTask, SkillMixture


def _rows(a):
    return {tuple(r) for r in a.tolist()}


def test_validation_comes_from_training_and_leaves_the_test_split_alone():
    plain, with_val = ArithmeticTask("+"), ArithmeticTask("+", val_fraction=0.1)
    np.testing.assert_array_equal(plain.operands("test"), with_val.operands("test"))
    train, val, test = (_rows(with_val.operands(s)) for s in ("train", "val", "test"))
    assert len(val) == 1000 and not (train & val or train & test or val & test)
    assert train | val == _rows(plain.operands("train"))
    with pytest.raises(ValueError, match="split must be one of"):
        plain.operands("val")  # no validation split unless asked for


def test_distance_skill():
    task = ArithmeticTask("|")
    assert task.format(7, 35) == "07|35=28" and task.format(35, 7) == "35|07=28"
    assert task.answer_len == 2 and len(task.operands("train")) + len(task.operands("test")) == 10_000


def test_mixture_batches_pad_with_ignored_targets():
    add, sub = ArithmeticTask("+"), ArithmeticTask("-")  # 9 and 8 tokens
    mix = SkillMixture({"add": add, "sub": sub})
    x, y = mix.get_batch("train", 64, np.random.default_rng(0))
    assert x.shape == y.shape == (64, 8)
    text = [add.tokenizer.decode(row) for row in x]
    n_sub = sum("-" in t for t in text)
    assert 10 < n_sub < 54 and sum("+" in t for t in text) == 64 - n_sub
    for row_x, row_y, t in zip(x, y, text):
        if "-" in t:  # one pad on the right, never a target
            assert t.endswith(" ") and row_y[-1] == IGNORE_INDEX
        assert (row_y != IGNORE_INDEX).sum() == (sub if "-" in t else add).answer_len
    same = mix.get_batch("train", 64, np.random.default_rng(0))
    np.testing.assert_array_equal(same[0], x)


def test_a_mixture_needs_two_skills_in_one_vocabulary():
    with pytest.raises(ValueError, match="at least two"):
        SkillMixture({"add": ArithmeticTask("+")})
