"""Accuracy-matrix metrics on hand-made matrices, the heat-map and the atomic JSON."""
import json
import math
import os

import pytest

from fastpeft.fileio import write_json_atomic

from fastpeft.continual import metrics as CM

R3 = [[0.9, 0.2, 0.1],
      [0.6, 0.8, 0.3],
      [0.5, 0.7, 0.95]]


def test_metrics_on_a_hand_made_matrix():
    assert CM.average_accuracy(R3) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert CM.learning_accuracy(R3) == pytest.approx((0.9 + 0.8 + 0.95) / 3)
    # forgetting: task 0 peaked at 0.9 (after task 0) -> 0.5; task 1 peaked at 0.8 (after task 1) -> 0.7
    assert CM.forgetting(R3) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert CM.backward_transfer(R3) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    s = CM.summarize(R3)
    assert s["final_row"] == [0.5, 0.7, 0.95] and s["forgetting"] == pytest.approx(0.25)


def test_forgetting_uses_the_peak_not_the_diagonal_and_bwt_can_be_positive():
    # task 0 improves after task 1 (0.6 -> 0.8), then drops to 0.7: forgetting 0.1 from the peak,
    # BWT +0.1 against the diagonal
    R = [[0.6, 0.0, 0.0], [0.8, 0.9, 0.0], [0.7, 0.9, 0.9]]
    assert CM.forgetting(R) == pytest.approx(((0.8 - 0.7) + (0.9 - 0.9)) / 2)
    assert CM.backward_transfer(R) == pytest.approx(((0.7 - 0.6) + 0.0) / 2)


def test_forgetting_ignores_accuracy_before_the_task_was_trained():
    # task 1 scored 0.7 zero-shot (after task 0) but only 0.6 once trained, and stays at 0.6: no forgetting
    R = [[0.9, 0.7, 0.5], [0.9, 0.6, 0.5], [0.9, 0.6, 0.8]]
    assert CM.forgetting(R) == 0.0 and CM.backward_transfer(R) == 0.0


def test_no_forgetting_and_one_task():
    R = [[0.7, 0.5], [0.7, 0.9]]
    assert CM.forgetting(R) == 0.0 and CM.backward_transfer(R) == 0.0
    assert CM.forgetting([[0.8]]) is None and CM.backward_transfer([[0.8]]) is None
    assert CM.average_accuracy([[0.8]]) == pytest.approx(0.8)


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [[0.1], [0.2]], "abc", [[math.nan, 0], [0, 1]]])
def test_bad_matrices_name_R(bad):
    with pytest.raises(ValueError, match="R:"):
        CM.summarize(bad)


def test_nan_above_the_diagonal_is_allowed():
    assert CM.forgetting([[0.9, math.nan], [0.5, 0.8]]) == pytest.approx(0.4)


def test_plot_and_json_are_written(tmp_path):
    png = CM.plot_matrices({"naive": R3, "replay": R3}, ["a", "b", "c"], str(tmp_path / "m.png"),
                           subtitles={"naive": "F=0.25"})
    if png is not None:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="task_names"):
        CM.plot_matrix(R3, ["a", "b"], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="matrices"):
        CM.plot_matrices({}, ["a"], str(tmp_path / "y.png"))
    p = write_json_atomic(str(tmp_path / "r.json"), {"R": R3, "x": float("nan")})
    with open(p) as f:
        assert json.load(f)["R"] == R3
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary files left
