"""Data and label mistakes are caught and named (issue 16, items 8 and 10): one-class training data is
refused; ``1`` and ``1.0`` are one class (one documented rule: numeric labels normalised); ``--limit`` 0 or
negative is an error; a file that is not UTF-8 is named with its line; random bytes and random labels
never get past the readers as anything but a DataError (property-based)."""
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpeft.cli import main
from fastpeft.workflow import get_task
from fastpeft.workflow.data import DataError, read_conll, read_table
from fastpeft.workflow.tasks.sequence_classification import normalize_label


def _tsv(path, rows, header="label\tsentence"):
    path.write_text(header + "\n" + "".join(f"{a}\t{b}\n" for a, b in rows))
    return str(path)


def test_one_class_training_data_is_refused(tmp_path):
    task = get_task("sequence_classification")
    recs = task.read(_tsv(tmp_path / "t.tsv", [("1", "good"), ("1.0", "fine"), (" 1", "great")]), {})
    with pytest.raises(DataError, match=r"t.tsv: every training example has the label '1'.*at least two"):
        task.fit_labels(recs)


@pytest.mark.parametrize("task_name,one,other", [
    ("image_classification", "cat", "dog"),
    # one directed relation: its reverse direction is added as a class, but the data still has one class
    ("relation_extraction", "Cause-Effect(e1,e2)", "Other"),
])
def test_one_class_training_data_is_refused_by_every_classification_task(task_name, one, other):
    task = get_task(task_name)
    recs = [{"label": one, "_source": "train.data", "_line": i + 1} for i in range(3)]
    with pytest.raises(DataError, match=re.escape(f"train.data: every training example has the label {one!r}")):
        task.fit_labels(recs)
    with pytest.raises(DataError, match="no labelled training examples"):
        task.fit_labels([])
    assert set(task.fit_labels(recs + [{"label": other, "_source": "train.data", "_line": 4}])) >= {one, other}


def test_one_class_training_data_fails_the_cli_in_one_line(tmp_path, tiny_model_dir, capsys):
    train = _tsv(tmp_path / "t.tsv", [("pos", "good"), ("pos", "fine")])
    rc = main(["finetune", "--model", tiny_model_dir, "--task", "sequence_classification", "--train", train,
               "--output-dir", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "at least two classes" in err and "Traceback" not in err


@pytest.mark.parametrize("raw,name", [("1", "1"), ("1.0", "1"), (" 01 ", "1"), ("+1", "1"), ("-2.0", "-2"),
                                      ("2.50", "2.5"), ("1e3", "1000"), ("pos", "pos"), (" neg ", "neg"),
                                      ("nan", "nan"), ("inf", "inf"), (1, "1"), (1.0, "1"), (True, "True"),
                                      ("12345678901234567890", "12345678901234567890")])
def test_numeric_labels_are_normalised(raw, name):
    assert normalize_label(raw) == name


def test_labels_1_and_1_0_are_one_class_in_training_and_evaluation(tmp_path):
    task = get_task("sequence_classification")
    recs = task.read(_tsv(tmp_path / "t.tsv", [("1", "a"), ("1.0", "b"), ("0", "c"), ("0.0", "d")]), {})
    assert task.fit_labels(recs) == ["0", "1"]
    ev = task.read(_tsv(tmp_path / "e.tsv", [("1.00", "x"), ("0", "y")]), {})
    assert [r["label"] for r in ev] == ["1", "0"]


@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=20))
def test_property_integer_labels_written_any_way_are_one_class(values):
    forms = [str(v) for v in values] + [f"{v}.0" for v in values] + [f" {v:+d} " for v in values]
    assert {normalize_label(f) for f in forms} == {str(v) for v in values}


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_a_limit_below_one_is_an_error(tmp_path, limit):
    path = _tsv(tmp_path / "t.tsv", [("1", "a"), ("0", "b")])
    with pytest.raises(ValueError, match="limit: expected a positive integer"):
        read_table(path, ["label", "sentence"], limit=limit)


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_evaluate_limit_zero_or_negative_is_refused(tmp_path, limit, capsys):
    # checked before the adapter is even read
    rc = main(["evaluate", "--adapter", str(tmp_path), "--data", "x.tsv", "--limit", limit])
    err = capsys.readouterr().err
    assert rc == 2 and "--limit: expected a positive integer" in err


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "conll"])
def test_non_utf8_data_names_file_and_line(tmp_path, fmt):
    good = {"tsv": b"label\tsentence\n1\tok\n", "csv": b"label,sentence\n1,ok\n",
            "jsonl": b'{"label": "1", "sentence": "ok"}\n', "conll": b"John B-PER\nleft O\n\n"}[fmt]
    bad = {"tsv": b"0\tna\xefve \xff\n", "csv": b"0,na\xff\n", "jsonl": b'{"label": "0", "sentence": "\xff"}\n',
           "conll": b"Z\xfcrich B-LOC\n"}[fmt]
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(good + good + bad)
    line = 2 * good.count(b"\n") + 1
    with pytest.raises(DataError, match=rf"d.{fmt}:{line}: not UTF-8 text"):
        if fmt == "conll":
            read_conll(str(path))
        else:
            read_table(str(path), ["label", "sentence"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200), fmt=st.sampled_from(["tsv", "csv", "jsonl", "conll"]))
def test_property_random_bytes_give_records_or_a_data_error(tmp_path, body, fmt):
    """Whatever a data file holds, the readers return records or raise DataError naming the file -- never
    another exception (a traceback on the command line)."""
    path = tmp_path / f"r.{fmt}"
    head = {"tsv": b"label\tsentence\n", "csv": b"label,sentence\n", "jsonl": b"", "conll": b""}[fmt]
    path.write_bytes(head + body)
    try:
        recs = read_conll(str(path)) if fmt == "conll" else read_table(str(path), ["label", "sentence"])
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert recs and all("_line" in r for r in recs)


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.sampled_from(["trainer.lr", "trainer.batch_size", "trainer.epochs", "trainer.max_steps",
                                        "trainer.warmup_ratio", "trainer.patience", "method.r",
                                        "method.lora_dropout", "data.max_length", "trainer.metric"]),
                       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10 ** 6),
                                 st.text(max_size=6), st.booleans(), st.none()), max_size=4))
def test_property_build_config_accepts_or_names_the_key(over):
    """The config check either accepts a value (then it is finite) or raises ConfigError naming the key."""
    from fastpeft.workflow.config import ConfigError, build_config
    try:
        cfg = build_config({"model": "m", "task": "sequence_classification", "data": {"train": "x.tsv"}}, over)
    except ConfigError as e:
        assert any(k in str(e) for k in over) or "trainer." in str(e) or "method." in str(e), str(e)
        return
    tr = cfg["trainer"]
    for k in ("lr", "warmup_ratio", "weight_decay"):
        v = getattr(tr, k)
        assert v == v and abs(v) != float("inf")
    json.dumps(cfg["method"])
