"""Tests for lora_numpy.metrics against small cases worked out by hand."""
import json

import numpy as np
import pytest

from lora_numpy.metrics import classification_report, confusion_matrix, exact_match

# A 3-class example: 8 examples, 3 of class 0, 3 of class 1, 2 of class 2.
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 0, 1, 1, 1, 2, 2, 0]


def test_exact_match_counts_only_full_rows():
    true = np.array([[0, 4, 2], [1, 2, 3], [9, 9, 9], [0, 0, 1]])
    pred = np.array([[0, 4, 2], [1, 2, 4], [9, 9, 9], [1, 0, 1]])
    assert exact_match(pred, true) == 0.5  # rows 0 and 2; one wrong token spoils a row
    assert exact_match(true, true) == 1.0


def test_exact_match_errors():
    with pytest.raises(ValueError, match="shape"):
        exact_match(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="shape"):
        exact_match(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="at least one row"):
        exact_match(np.zeros((0, 3)), np.zeros((0, 3)))


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.dtype == np.int64
    # Row = true class, column = prediction.
    assert cm.tolist() == [
        [2, 1, 0],  # class 0: two right, one called 1
        [0, 2, 1],  # class 1: two right, one called 2
        [1, 0, 1],  # class 2: one right, one called 0
    ]


def test_confusion_matrix_is_not_symmetric_in_its_arguments():
    assert confusion_matrix([0, 0], [0, 1], 2).tolist() == [[1, 1], [0, 0]]
    assert confusion_matrix([0, 1], [0, 0], 2).tolist() == [[1, 0], [1, 0]]


def test_classification_report_by_hand():
    r = classification_report(np.array(Y_TRUE), np.array(Y_PRED), 3)
    assert r["accuracy"] == pytest.approx(5 / 8)
    # Precision = diagonal / column sums (3, 3, 2); recall = diagonal / row sums (3, 3, 2).
    assert r["precision"] == pytest.approx([2 / 3, 2 / 3, 1 / 2])
    assert r["recall"] == pytest.approx([2 / 3, 2 / 3, 1 / 2])
    assert r["f1"] == pytest.approx([2 / 3, 2 / 3, 1 / 2])  # F1 = p when p == r
    assert r["support"] == [3, 3, 2]
    assert r["macro_precision"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r["macro_f1"] == pytest.approx(11 / 18)
    json.dumps(r)  # plain Python numbers only


def test_classification_report_precision_differs_from_recall():
    # True:  0 0 0 0 1 1;  predicted: 0 0 0 1 1 1.
    r = classification_report([0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1], 2)
    assert r["precision"] == pytest.approx([1.0, 2 / 3])
    assert r["recall"] == pytest.approx([3 / 4, 1.0])
    assert r["f1"] == pytest.approx([6 / 7, 4 / 5])  # 2pr / (p + r)


def test_class_never_predicted_and_class_never_present():
    # Always predicting class 0: classes 1 and 2 are never predicted; class 2 never occurs.
    r = classification_report([0, 0, 0, 1], [0, 0, 0, 0], 3)
    assert r["accuracy"] == 0.75
    assert r["precision"] == pytest.approx([0.75, 0.0, 0.0])
    assert r["recall"] == pytest.approx([1.0, 0.0, 0.0])
    assert r["f1"] == pytest.approx([6 / 7, 0.0, 0.0])
    assert r["support"] == [3, 1, 0]
    assert r["macro_recall"] == pytest.approx(1 / 3)  # absent classes still count in the mean


def test_label_validation():
    with pytest.raises(ValueError, match="label 3"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="label -1"):
        confusion_matrix([0, 1], [0, -1], 3)
    with pytest.raises(ValueError, match="2 labels but y_pred has 3"):
        confusion_matrix([0, 1], [0, 1, 1], 3)
    with pytest.raises(ValueError, match="1-D"):
        confusion_matrix([[0, 1]], [[0, 1]], 3)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix([0.0, 1.0], [0, 1], 3)
    with pytest.raises(ValueError, match="at least one example"):
        classification_report([], [], 3)
