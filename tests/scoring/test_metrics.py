"""Metrics on hand-computed matrices, including a lower-is-better (perplexity) case."""

import pytest

from cl_runner.scoring import cl_metrics as metrics

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


def test_forgetting_ignores_scores_before_the_task_was_trained():
    # task 1 scored 0.95 before it was trained (after task 0): that is not a level it had learnt and lost
    r = [[0.9, 0.95, 0.1], [0.5, 0.6, 0.2], [0.4, 0.5, 0.7]]
    assert metrics.forgetting_per_task(r, UP) == pytest.approx([0.5, 0.1, None])
    ppl = [[10.0, 2.0, 9.0], [12.0, 5.0, 9.0], [15.0, 6.0, 4.0]]  # lower is better: 2.0 came before training
    assert metrics.forgetting_per_task(ppl, [False] * 3) == pytest.approx([5.0, 1.0, None])


def test_best_is_the_highest_accuracy_from_the_task_on():
    r = [[0.9, 0.95, 0.1], [0.5, 0.6, 0.2], [0.4, 0.5, 0.7]]
    summary = metrics.summarize(r, [0.0, 0.0, 0.0], UP, ["a", "b", "c"])
    assert [row["best"] for row in summary["per_task"]] == [0.9, 0.6, 0.7]


def test_summary_holds_every_number():
    # task 0 accuracy, task 1 perplexity (lower is better)
    r = [[0.8, 40.0], [0.6, 10.0]]
    init, up = [0.2, 50.0], [True, False]
    s = metrics.summarize(r, init, up, ["acc", "ppl"])
    # curves: acc 0.2, 0.8, 0.6 -> (0.5 + 0.7) / 2 = 0.6; ppl 50, 40, 10 -> (45 + 25) / 2 = 35
    assert s["average_accuracy"] == pytest.approx((0.6 + 10.0) / 2)
    assert s["average_forgetting"] == pytest.approx(0.2)
    assert s["backward_transfer"] == pytest.approx(-0.2)
    assert s["forward_transfer"] == pytest.approx(10.0)  # -(40 - 50)
    assert s["average_learning_curve_area"] == pytest.approx((0.6 + 35.0) / 2)
    assert s["per_task"] == [
        {"task": "acc", "init": 0.2, "just_trained": 0.8, "final": 0.6, "best": 0.8,
         "forgetting": pytest.approx(0.2), "learning_curve_area": pytest.approx(0.6)},
        {"task": "ppl", "init": 50.0, "just_trained": 10.0, "final": 10.0, "best": 10.0, "forgetting": None,
         "learning_curve_area": pytest.approx(35.0)},
    ]


def test_learning_curve_area_of_every_task():
    areas = metrics.learning_curve_area(R, INIT)
    # task 1: 0.1, 0.1, 0.8, 0.6 -> (0.1 + 0.45 + 0.7) / 3; task 2: 0.1, 0.2, 0.3, 0.7 -> (0.15 + 0.25 + 0.5) / 3
    assert areas == pytest.approx([1.6 / 3, 1.25 / 3, 0.9 / 3])


@pytest.mark.parametrize(
    ("matrix", "init", "up", "message"),
    [
        ([], [], [], r"^score matrix must be T x T with T >= 1, got \[\]$"),
        ([[0.1, 0.2], [0.3]], [0.0, 0.0], [True, True], r"^score matrix must be T x T with T >= 1, got \[2, 1\]$"),
        ([[0.1]], [0.0, 0.0], [True], "^init row and higher_is_better must have one entry per task$"),
        ([[0.1]], [0.0], [True, True], "^init row and higher_is_better must have one entry per task$"),
    ],
)
def test_inconsistent_shapes_are_rejected_with_the_reason(matrix, init, up, message):
    with pytest.raises(ValueError, match=message):
        metrics.summarize(matrix, init, up, ["a"] * len(up))
