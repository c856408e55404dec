"""Metrics against hand-computed values."""
import math

import pytest

from fastpeft.workflow.metrics import accuracy, bio_entities, entity_prf, macro_f1, perplexity


def test_accuracy_and_macro_f1_by_hand():
    preds = [0, 1, 1, 2, 2, 2]
    gold = [0, 1, 2, 2, 2, 0]
    assert accuracy(preds, gold) == pytest.approx(4 / 6)
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp2 fp1 fn1 -> 4/6
    assert macro_f1(preds, gold) == pytest.approx((2 / 3 + 2 / 3 + 2 / 3) / 3)
    # a class never seen nor predicted counts as 0 when listed explicitly
    assert macro_f1(preds, gold, classes=[0, 1, 2, 3]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="predictions"):
        accuracy([0], [0, 1])


def test_bio_entities_spans():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "I-MISC"]
    assert bio_entities(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 6, 7), ("MISC", 8, 9)}
    assert bio_entities(["O", "O"]) == set()
    with pytest.raises(ValueError, match="BIO"):
        bio_entities(["PER"])


def test_entity_prf_exact_span_and_type():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "O", "O", "B-LOC"],        # PER span too short (wrong), LOC right
            ["B-ORG", "O", "B-LOC", "I-LOC"]]    # ORG right, MISC typed as LOC (wrong)
    r = entity_prf(pred, gold)
    assert (r["n_gold"], r["n_pred"], r["n_correct"]) == (4, 4, 2)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(0.5)
    # extra predicted entity lowers precision only
    r = entity_prf([["B-PER", "I-PER", "B-LOC", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]])
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(1.0)
    assert r["f1"] == pytest.approx(0.8)
    assert entity_prf([["O"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError, match="sentence 0"):
        entity_prf([["O"]], [["O", "O"]])


def test_perplexity():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == float("inf")
