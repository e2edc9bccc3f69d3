"""Tests for lora_numpy.data: tokenizer, text corpora and batching, and the fine-tuning tasks."""
import json

import numpy as np
import pytest

from lora_numpy.data import (
    ARITHMETIC_CHARS,
    IGNORE_INDEX,
    ArithmeticTask,
    CharTokenizer,
    SumClassificationTask,
    TextDataset,
    load_text_file,
    stdlib_docs_text,
)

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


# ---- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_ids_follow_given_order_and_dedupe():
    tok = CharTokenizer("banana")
    assert tok.chars == "ban"
    assert tok.vocab_size == 3
    ids = tok.encode("nab")
    assert ids.dtype == np.int64
    assert ids.tolist() == [2, 1, 0]


def test_from_text_sorts_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"


def test_round_trip_including_non_ascii():
    text = "naïve “quotes” … and ß\n\ttabs"
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.decode([]) == ""
    assert tok.encode("").shape == (0,)


def test_unknown_character_error_names_char_position_and_fix():
    tok = CharTokenizer("abc ")
    with pytest.raises(ValueError) as err:
        tok.encode("ab cz")
    msg = str(err.value)
    assert "'z'" in msg and "position 4" in msg
    assert "unk_token='?'" in msg and "add it to the vocabulary" in msg
    # A code point far beyond the lookup table is unknown too, not an IndexError.
    with pytest.raises(ValueError, match="position 1"):
        tok.encode("a\U0001F600")


def test_unk_token_maps_unknown_characters():
    tok = CharTokenizer("ab?", unk_token="?")
    assert tok.encode("axb\U0001F600").tolist() == [0, 2, 1, 2]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CharTokenizer("ab", unk_token="?")


def test_decode_rejects_bad_ids():
    tok = CharTokenizer("ab")
    with pytest.raises(ValueError, match="id 2 at position 1"):
        tok.decode([0, 2])
    with pytest.raises(ValueError, match="one sequence"):
        tok.decode(np.zeros((2, 2), dtype=np.int64))


def test_to_dict_json_round_trip():
    tok = CharTokenizer("xyz?", unk_token="?")
    again = CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.chars == tok.chars and again.unk_token == "?"
    assert again.encode("zq").tolist() == tok.encode("zq").tolist() == [2, 3]


# ---- text corpora ----------------------------------------------------------------------------

def test_stdlib_docs_text_is_large_and_deterministic():
    text = stdlib_docs_text()
    assert len(text.encode("utf-8")) > 100_000
    assert text == stdlib_docs_text()
    assert "assert" in text


def test_load_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo\n", encoding="utf-8")
    assert load_text_file(path) == "héllo\n"
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text_file(missing)


def test_text_dataset_split_and_windows():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    ds = TextDataset(text, val_fraction=0.1)
    assert len(ds.train_tokens) == 900 and len(ds.val_tokens) == 100
    # Train is the first part of the stream and validation the last, in order.
    assert ds.tokenizer.decode(np.concatenate([ds.train_tokens, ds.val_tokens])) == text

    x, y = ds.get_batch("train", 16, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for row_x, row_y in zip(x, y):
        window = ds.tokenizer.decode(np.append(row_x, row_y[-1]))
        assert window in text[:900]  # consecutive tokens of the train part


def test_text_dataset_windows_reach_the_end_of_a_split():
    ds = TextDataset("abcdefghij", tokenizer=CharTokenizer("abcdefghij"), val_fraction=0.5)
    x, y = ds.get_batch("val", 50, 4, np.random.default_rng(0))
    # "fghij" has exactly one window of 4 + 1 tokens.
    assert (ds.tokenizer.decode(x[0]), ds.tokenizer.decode(y[0])) == ("fghi", "ghij")
    assert (x == x[0]).all()


def test_text_dataset_determinism_and_errors():
    ds = TextDataset(stdlib_docs_text()[:20_000])
    a = ds.get_batch("train", 4, 32, np.random.default_rng(7))
    b = ds.get_batch("train", 4, 32, np.random.default_rng(7))
    c = ds.get_batch("train", 4, 32, np.random.default_rng(8))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="split must be one of"):
        ds.get_batch("test", 4, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="do not fit"):
        ds.get_batch("val", 4, len(ds.val_tokens), np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        ds.get_batch("train", 4, 32, 0)


# ---- arithmetic ------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["+", "-", "*"])
@pytest.mark.parametrize("reverse", [False, True])
def test_every_arithmetic_answer_is_correct(op, reverse):
    task = ArithmeticTask(op, n_digits=2, reverse_answer=reverse)
    for split in ("train", "test"):
        prompts, answers = task.examples(split)
        operands = task.operands(split)
        assert prompts.shape == (len(operands), task.prompt_len) and prompts.dtype == np.int64
        assert answers.shape == (len(operands), task.answer_len)
        for (a, b), prompt, answer in zip(operands, prompts, answers):
            assert task.tokenizer.decode(prompt) == f"{a:02d}{op}{b:02d}="
            assert task.decode_answer(answer) == OPS[op](a, b)


def test_arithmetic_formats_and_widths():
    assert ArithmeticTask("+").format(7, 35) == "07+35=042"
    assert ArithmeticTask("+", reverse_answer=True).format(7, 35) == "07+35=240"
    assert ArithmeticTask("-").format(35, 7) == "35-07=28"
    assert ArithmeticTask("*").format(7, 35) == "07*35=0245"
    widths = {op: ArithmeticTask(op).answer_len for op in "+-*"}
    assert widths == {"+": 3, "-": 2, "*": 4}
    task = ArithmeticTask("+", n_digits=3)
    assert (task.prompt_len, task.answer_len, task.seq_len) == (8, 4, 12)


def test_subtraction_has_no_negative_results():
    task = ArithmeticTask("-", n_digits=2, test_fraction=0.0)
    ops = task.operands("train")
    assert len(ops) == 100 * 101 // 2  # the pairs with a >= b
    assert (ops[:, 0] >= ops[:, 1]).all()
    with pytest.raises(ValueError, match="a >= b"):
        task.format(3, 4)


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_arithmetic_train_test_disjoint_and_complete(op):
    task = ArithmeticTask(op, n_digits=2, test_fraction=0.1, seed=3)
    train = {tuple(p) for p in task.operands("train").tolist()}
    test = {tuple(p) for p in task.operands("test").tolist()}
    assert not train & test
    n = 5050 if op == "-" else 10_000
    assert len(train) + len(test) == n and len(test) == round(0.1 * n)


def test_arithmetic_split_depends_on_seed():
    a = ArithmeticTask(seed=0).operands("test")
    assert np.array_equal(a, ArithmeticTask(seed=0).operands("test"))
    assert not np.array_equal(a, ArithmeticTask(seed=1).operands("test"))


def test_arithmetic_batch_masks_exactly_the_prompt_targets():
    task = ArithmeticTask("+", n_digits=2, reverse_answer=True)
    x, y = task.get_batch("train", 32, np.random.default_rng(0))
    assert x.shape == y.shape == (32, task.seq_len - 1) and x.dtype == y.dtype == np.int64
    ignored = y == IGNORE_INDEX
    assert ignored[:, : task.prompt_len - 1].all()
    assert not ignored[:, task.prompt_len - 1 :].any()
    assert (~ignored).sum(axis=1).tolist() == [task.answer_len] * 32
    # Unmasked targets are the next tokens; the last row element completes the sequence.
    assert np.array_equal(y[:, task.prompt_len - 1 : -1], x[:, task.prompt_len :])
    train = {tuple(p) for p in task.operands("train").tolist()}
    for row_x, row_y in zip(x, y):
        text = task.tokenizer.decode(np.append(row_x, row_y[-1]))
        a, b = int(text[:2]), int(text[3:5])
        assert (a, b) in train and text == task.format(a, b)


def test_arithmetic_batches_are_deterministic():
    task = ArithmeticTask("*")
    a = task.get_batch("test", 8, np.random.default_rng(5))
    b = task.get_batch("test", 8, np.random.default_rng(5))
    c = task.get_batch("test", 8, np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_arithmetic_vocabulary_is_shared():
    assert ArithmeticTask("+").tokenizer.chars == ArithmeticTask("*").tokenizer.chars
    assert ArithmeticTask("+").tokenizer.chars == ARITHMETIC_CHARS


def test_arithmetic_errors():
    with pytest.raises(ValueError, match=r"\['\+', '-', '\*', '\|'\]"):
        ArithmeticTask("/")
    with pytest.raises(ValueError, match="n_digits"):
        ArithmeticTask(n_digits=0)
    with pytest.raises(ValueError, match="n_digits"):
        ArithmeticTask(n_digits=4)
    with pytest.raises(ValueError, match="test_fraction"):
        ArithmeticTask(test_fraction=1.0)
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="split must be one of"):
        task.examples("val")
    with pytest.raises(ValueError, match="not a number"):
        task.decode_answer(task.tokenizer.encode("4+2"))
    with pytest.raises(ValueError, match="2 digit"):
        task.format(100, 1)


# ---- classification --------------------------------------------------------------------------

def test_classification_labels_and_names():
    task = SumClassificationTask()
    assert task.n_classes == 3
    assert task.class_names == ["sum<66", "66<=sum<133", "sum>=133"]
    assert task.format(7, 35) == "07+35"
    assert [task.label(a, b) for a, b in [(0, 65), (0, 66), (99, 33), (34, 99), (99, 99)]] == [
        0, 1, 1, 2, 2,
    ]
    for split in ("train", "test"):
        x, lengths, labels = task.examples(split)
        ops = task.operands(split)
        assert x.shape == (len(ops), 5) and lengths.tolist() == [5] * len(ops)
        expected = np.digitize(ops.sum(axis=1), [66, 133])
        assert np.array_equal(labels, expected)
        assert task.tokenizer.decode(x[0]) == task.format(*ops[0])


def test_classification_class_counts_match_hand_computation():
    task = SumClassificationTask()
    total = task.class_counts("train") + task.class_counts("test")
    # Pairs with a + b <= 65: 1 + 2 + ... + 66 = 2211; the top class mirrors it.
    assert total.tolist() == [2211, 5578, 2211]
    assert task.class_counts("test").sum() == 2000


def test_classification_train_test_disjoint_and_deterministic():
    task = SumClassificationTask(seed=4)
    train = {tuple(p) for p in task.operands("train").tolist()}
    test = {tuple(p) for p in task.operands("test").tolist()}
    assert not train & test and len(train | test) == 10_000

    a = task.get_batch("train", 16, np.random.default_rng(1))
    b = task.get_batch("train", 16, np.random.default_rng(1))
    c = task.get_batch("train", 16, np.random.default_rng(2))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    x, lengths, labels = a
    assert x.shape == (16, 5) and lengths.shape == labels.shape == (16,)
    assert x.dtype == lengths.dtype == labels.dtype == np.int64
    for row, label in zip(x, labels):
        text = task.tokenizer.decode(row)
        assert (int(text[:2]), int(text[3:])) in train
        assert label == task.label(int(text[:2]), int(text[3:]))


def test_classification_errors():
    with pytest.raises(ValueError, match="boundaries"):
        SumClassificationTask(boundaries=(133, 66))
    with pytest.raises(ValueError, match="boundaries"):
        SumClassificationTask(boundaries=(50, 199))  # the largest sum is 198
    with pytest.raises(ValueError, match="boundaries"):
        SumClassificationTask(boundaries=())
