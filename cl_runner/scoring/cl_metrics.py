"""Continual-learning metrics: pure functions of the score matrix. No torch.

Notation: T tasks; ``R[i][j]`` is the score on task j after training task i (0-based); ``b[j]`` the score of
the untrained model on task j (the "init" row). ``s_j = +1`` when higher is better (accuracy) and ``-1`` when
lower is better (perplexity), so that every metric below reads the same way for both: forgetting > 0 means
worse, BWT/FWT > 0 mean better.

- average accuracy  ACC = (1/T) sum_j R[T-1][j]        (the final row's mean score, in the metric's own units)
- forgetting        f_j = max_{j <= i < T-1} s_j R[i][j] - s_j R[T-1][j]      for j < T-1
                    average forgetting F = mean_j f_j (the best score a task had after it was learned, minus
                    its final score; Chaudhry et al. 2018 restricted to stages after task j was trained)
- backward transfer BWT = (1/(T-1)) sum_{j<T-1} s_j (R[T-1][j] - R[j][j])      (Lopez-Paz & Ranzato 2017)
- forward transfer  FWT = (1/(T-1)) sum_{j>0} s_j (R[j-1][j] - b[j])           (Lopez-Paz & Ranzato 2017)
- learning-curve area of task j: the trapezoidal area under its score across the T+1 stages (init, after
  task 1, ..., after task T) divided by T, i.e. the curve's mean height; ``average_learning_curve_area`` is
  the mean over tasks.
With one task, forgetting, BWT and FWT are undefined and reported as None.

Unscored cells: a matrix cell may be None when the stage schedule (``eval.full_every``) did not score that task
at that stage; the init and final rows are always complete, and so are R[j][j] and R[j-1][j], so ACC, BWT and
FWT stay exact. Forgetting and "best" then take the best over the *scored* stages (a lower bound on the
forgetting of the full matrix), and the learning-curve area joins the scored points with straight lines. A
metric whose cells are missing is None.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _check(matrix: Matrix, init: Sequence[float], higher_is_better: Sequence[bool]) -> int:
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix):
        raise ValueError(f"score matrix must be T x T with T >= 1, got {[len(r) for r in matrix]}")
    if len(init) != t or len(higher_is_better) != t:
        raise ValueError("init row and higher_is_better must have one entry per task")
    if None in matrix[-1] or None in init:
        raise ValueError("the init row and the final row must score every task")
    return t


def _signs(higher_is_better: Sequence[bool]) -> list[int]:
    return [1 if h else -1 for h in higher_is_better]


def average_accuracy(matrix: Matrix) -> float:
    return sum(matrix[-1]) / len(matrix[-1])


def forgetting_per_task(matrix: Matrix, higher_is_better: Sequence[bool]) -> list[float | None]:
    t = len(matrix)
    signs = _signs(higher_is_better)
    out: list[float | None] = []
    for j in range(t):
        if j == t - 1:
            out.append(None)
            continue
        scored = [signs[j] * matrix[i][j] for i in range(j, t - 1) if matrix[i][j] is not None]
        out.append(max(scored) - signs[j] * matrix[t - 1][j] if scored else None)
    return out


def average_forgetting(matrix: Matrix, higher_is_better: Sequence[bool]) -> float | None:
    values = [f for f in forgetting_per_task(matrix, higher_is_better) if f is not None]
    return sum(values) / len(values) if values else None


def backward_transfer(matrix: Matrix, higher_is_better: Sequence[bool]) -> float | None:
    t = len(matrix)
    if t < 2:
        return None
    signs = _signs(higher_is_better)
    if any(matrix[j][j] is None for j in range(t - 1)):
        return None
    return sum(signs[j] * (matrix[t - 1][j] - matrix[j][j]) for j in range(t - 1)) / (t - 1)


def forward_transfer(matrix: Matrix, init: Sequence[float], higher_is_better: Sequence[bool]) -> float | None:
    t = len(matrix)
    if t < 2:
        return None
    signs = _signs(higher_is_better)
    if any(matrix[j - 1][j] is None for j in range(1, t)):
        return None
    return sum(signs[j] * (matrix[j - 1][j] - init[j]) for j in range(1, t)) / (t - 1)


def learning_curve_area(matrix: Matrix, init: Sequence[float]) -> list[float]:
    t = len(matrix)
    areas = []
    for j in range(t):
        curve = [(0, init[j])] + [(i + 1, matrix[i][j]) for i in range(t) if matrix[i][j] is not None]
        areas.append(sum((x1 - x0) * (a + b) / 2 for (x0, a), (x1, b) in zip(curve, curve[1:], strict=False)) / t)
    return areas


def summarize(
    matrix: Matrix, init: Sequence[float], higher_is_better: Sequence[bool], task_names: Sequence[str]
) -> dict:
    """All summary metrics and the per-task rows, as JSON-able data."""
    _check(matrix, init, higher_is_better)
    forgetting = forgetting_per_task(matrix, higher_is_better)
    areas = learning_curve_area(matrix, init)
    signs = _signs(higher_is_better)
    per_task = [
        {
            "task": name,
            "init": init[j],
            "just_trained": matrix[j][j],
            "final": matrix[-1][j],
            "best": (max if signs[j] > 0 else min)(matrix[i][j] for i in range(j, len(matrix))
                                                    if matrix[i][j] is not None),
            "forgetting": forgetting[j],
            "learning_curve_area": areas[j],
        }
        for j, name in enumerate(task_names)
    ]
    return {
        "average_accuracy": average_accuracy(matrix),
        "average_forgetting": average_forgetting(matrix, higher_is_better),
        "backward_transfer": backward_transfer(matrix, higher_is_better),
        "forward_transfer": forward_transfer(matrix, init, higher_is_better),
        "average_learning_curve_area": sum(areas) / len(areas),
        "per_task": per_task,
    }
