"""Metrics on hand-computed matrices, including a lower-is-better (perplexity) case."""

import pytest

from cl_runner import metrics

R = [
    [0.9, 0.1, 0.2],
    [0.5, 0.8, 0.3],
    [0.4, 0.6, 0.7],
]
INIT = [0.0, 0.1, 0.1]
UP = [True, True, True]


def test_average_accuracy_is_final_row_mean():
    assert metrics.average_accuracy(R) == pytest.approx((0.4 + 0.6 + 0.7) / 3)


def test_forgetting_uses_best_score_after_learning():
    # task 0: max(0.9, 0.5) - 0.4 = 0.5; task 1: max(0.8) - 0.6 = 0.2
    assert metrics.forgetting_per_task(R, UP) == pytest.approx([0.5, 0.2, None])
    assert metrics.average_forgetting(R, UP) == pytest.approx(0.35)


def test_backward_and_forward_transfer():
    assert metrics.backward_transfer(R, UP) == pytest.approx(((0.4 - 0.9) + (0.6 - 0.8)) / 2)
    # FWT: (R[0][1] - b1) + (R[1][2] - b2) = (0.1 - 0.1) + (0.3 - 0.1)
    assert metrics.forward_transfer(R, INIT, UP) == pytest.approx(0.1)


def test_learning_curve_area_is_mean_trapezoid_height():
    areas = metrics.learning_curve_area(R, INIT)
    # task 0 curve: 0, .9, .5, .4 -> (.45 + .7 + .45) / 3
    assert areas[0] == pytest.approx((0.45 + 0.7 + 0.45) / 3)


def test_lower_is_better_signs_make_forgetting_positive():
    ppl = [[10.0, 50.0], [30.0, 12.0]]  # task 0's perplexity rose from 10 to 30 after task 1: forgetting
    down = [False, False]
    assert metrics.forgetting_per_task(ppl, down) == pytest.approx([20.0, None])
    assert metrics.backward_transfer(ppl, down) == pytest.approx(-20.0)
    # task 1 ppl before training it (after task 0) 50 vs init 60: lower is better, so FWT = +10
    assert metrics.forward_transfer(ppl, [60.0, 60.0], down) == pytest.approx(10.0)
    summary = metrics.summarize(ppl, [60.0, 60.0], down, ["a", "b"])
    assert summary["per_task"][0]["best"] == 10.0


def test_single_task_has_no_transfer_metrics():
    s = metrics.summarize([[0.7]], [0.1], [True], ["only"])
    assert s["average_forgetting"] is None and s["backward_transfer"] is None and s["forward_transfer"] is None
    assert s["average_accuracy"] == pytest.approx(0.7)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        metrics.summarize([[0.1, 0.2]], [0.0], [True], ["a"])
