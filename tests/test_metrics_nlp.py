"""Entity-level scores (seqeval's definition) and chrF (sacrebleu's), on hand-built cases."""
import pytest

from lora_numpy.metrics import bio_entities, chrf, entity_scores, token_accuracy

TRUE = ["B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]


def test_bio_entities_reads_spans_as_seqeval_does():
    assert bio_entities(TRUE) == [("PER", 0, 2), ("LOC", 4, 5)]
    assert bio_entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]         # I after O starts one
    assert bio_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]  # a type change splits
    assert bio_entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    with pytest.raises(ValueError, match="not BIO"):
        bio_entities(["X-PER"])


def test_exact_prediction_scores_one():
    s = entity_scores([TRUE], [TRUE])
    assert (s.precision, s.recall, s.f1, s.n_correct) == (1.0, 1.0, 1.0, 2)


def test_wrong_type_is_a_miss_and_a_false_positive():
    pred = ["B-ORG", "I-ORG", "I-ORG", "O", "B-LOC", "I-LOC", "O"]
    s = entity_scores([TRUE], [pred])
    assert (s.n_true, s.n_pred, s.n_correct) == (2, 2, 1)
    assert s.precision == 0.5 and s.recall == 0.5 and s.f1 == 0.5
    assert s.per_type["ORG"][:3] == (0.0, 0.0, 0.0) and s.per_type["PER"][3] == 1


def test_wrong_boundary_is_a_miss_though_token_accuracy_stays_high():
    pred = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]  # one character short
    s = entity_scores([TRUE], [pred])
    assert (s.precision, s.recall) == (0.5, 0.5)
    ids = {t: i for i, t in enumerate(sorted(set(TRUE + pred)))}
    acc = token_accuracy([[ids[t] for t in TRUE]], [[ids[t] for t in pred]])
    assert acc == pytest.approx(6 / 7)  # 86% of tokens right, half the entities wrong


def test_split_entity_counts_two_false_positives():
    pred = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "I-LOC", "O"]  # "Ada Lovelace" cut in two
    s = entity_scores([TRUE], [pred])
    assert (s.n_true, s.n_pred, s.n_correct) == (2, 3, 1)
    assert s.precision == pytest.approx(1 / 3) and s.recall == 0.5
    assert s.f1 == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))


def test_entities_do_not_merge_across_sentences():
    s = entity_scores([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["I-PER", "O"]])
    assert s.n_true == 2


def test_no_entities_predicted_gives_zero_not_nan():
    s = entity_scores([TRUE], [["O"] * len(TRUE)])
    assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)


def test_against_seqeval():
    metrics = pytest.importorskip("seqeval.metrics")
    true = [TRUE, ["O", "B-ORG", "I-ORG", "B-PER"], ["I-LOC", "I-LOC", "O"]]
    pred = [["B-PER", "I-LOC", "I-PER", "O", "B-LOC", "I-LOC", "O"], ["O", "B-ORG", "I-ORG", "I-PER"],
            ["B-LOC", "I-LOC", "O"]]
    s = entity_scores(true, pred)
    assert s.precision == pytest.approx(metrics.precision_score(true, pred))
    assert s.recall == pytest.approx(metrics.recall_score(true, pred))
    assert s.f1 == pytest.approx(metrics.f1_score(true, pred))


def test_chrf_hand_built_cases():
    assert chrf(["quatre-vingts"], ["quatre-vingts"]) == pytest.approx(100.0)
    assert chrf(["abc"], ["xyz"]) == 0.0
    # "ab" vs "abc": order 1 P=2/2, R=2/3; order 2 P=1/1, R=1/2; orders 3..6 have no hypothesis
    # n-grams and are left out. P̄ = 1, R̄ = 7/12, chrF = 100·5·P̄R̄/(4P̄ + R̄) = 100·7/11.
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 7 / 11)
    assert chrf(["a b"], ["ab c"]) == pytest.approx(100 * 7 / 11)  # whitespace is removed
    # recall weighs more than precision (β = 2): missing text costs more than extra text
    assert chrf(["abcdef"], ["abcdefghijkl"]) < chrf(["abcdefghijkl"], ["abcdef"])


def test_chrf_against_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["quatre vingt dix", "deux cents mille", "cent", "soixante et onze", "x"]
    refs = ["quatre-vingt-dix", "deux cent mille", "cent un", "soixante et onze", "mille"]
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
