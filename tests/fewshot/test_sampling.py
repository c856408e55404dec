from collections import Counter

import pytest

from fastpeft.fewshot.sampling import class_counts, k_shot_records, sample_k_shot

LABELS = ["a"] * 10 + ["b"] * 7 + ["c"] * 5


def test_k_per_class_distinct_and_in_class():
    for seed in range(5):
        idx = sample_k_shot(LABELS, 4, seed)
        assert len(idx) == len(set(idx)) == 12
        assert Counter(LABELS[i] for i in idx) == {"a": 4, "b": 4, "c": 4}
        assert all(0 <= i < len(LABELS) for i in idx)


def test_reproducible_and_seed_dependent():
    assert sample_k_shot(LABELS, 3, 7) == sample_k_shot(LABELS, 3, 7)
    draws = {tuple(sorted(sample_k_shot(LABELS, 3, s))) for s in range(6)}
    assert len(draws) > 1


def test_classes_interleaved_not_grouped():
    # the returned order is shuffled: over a few seeds not every draw is grouped by class
    grouped = 0
    for s in range(5):
        labs = [LABELS[i] for i in sample_k_shot(LABELS, 4, s)]
        grouped += labs == sorted(labs)
    assert grouped < 5


def test_k_equal_class_size_takes_whole_class():
    idx = sample_k_shot(LABELS, 5, 0)
    assert {i for i in idx if LABELS[i] == "c"} == set(range(17, 22))


def test_exclude_is_honoured():
    excl = set(range(0, 5))
    for s in range(3):
        assert not excl & set(sample_k_shot(LABELS, 5, s, exclude=excl))
    with pytest.raises(ValueError, match="k=6"):
        sample_k_shot(LABELS, 6, 0, exclude=excl)  # "a" has 5 left


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k"):
        sample_k_shot(LABELS, k, 0)


def test_k_larger_than_a_class_names_class_and_k():
    with pytest.raises(ValueError, match=r"k=6.*'c': 5"):
        sample_k_shot(LABELS, 6, 0)


def test_fewer_than_two_classes():
    with pytest.raises(ValueError, match="labels: .*2 classes"):
        sample_k_shot(["x"] * 5, 1, 0)
    with pytest.raises(ValueError, match="labels"):
        sample_k_shot([], 1, 0)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        sample_k_shot(LABELS, 1, 1.0)


def test_records_and_counts():
    recs = [{"text": str(i), "label": l} for i, l in enumerate(LABELS)]
    out = k_shot_records(recs, 2, 1)
    assert Counter(r["label"] for r in out) == {"a": 2, "b": 2, "c": 2}
    assert out == [recs[i] for i in sample_k_shot(LABELS, 2, 1)]
    with pytest.raises(ValueError, match="label_key"):
        k_shot_records(recs, 2, 1, label_key="y")
    assert list(class_counts(["10", "2", "2"])) == ["2", "10"]
