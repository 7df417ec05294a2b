"""Metrics against a brute-force reference written from the definitions, on random score matrices of 1-5 tasks
with mixed directions (accuracy and perplexity tasks side by side)."""

import random

import pytest

from cl_runner.scoring import cl_metrics as metrics


def reference(r, init, up):
    """Every number of ``metrics.summarize``, by the plainest loops: stages are 0 (init), 1..T (after task i-1)."""
    t = len(r)

    def stage(k, j):  # the score of task j at stage k
        return init[j] if k == 0 else r[k - 1][j]

    def better(a, b, j):  # is a better than b for task j
        return a > b if up[j] else a < b

    per_task = []
    for j in range(t):
        best = stage(j + 1, j)
        for k in range(j + 2, t + 1):
            if better(stage(k, j), best, j):
                best = stage(k, j)
        if j < t - 1:  # the best of the stages after task j was trained, excluding the final one
            peak = stage(j + 1, j)
            for k in range(j + 2, t):
                if better(stage(k, j), peak, j):
                    peak = stage(k, j)
            forgetting = abs(peak - r[t - 1][j]) * (1 if better(peak, r[t - 1][j], j) else -1)
        else:
            forgetting = None
        heights = [stage(k, j) for k in range(t + 1)]  # unit spacing: area = sum - (first + last) / 2
        area = (sum(heights) - (heights[0] + heights[-1]) / 2) / t
        per_task.append({"init": init[j], "just_trained": r[j][j], "final": r[t - 1][j], "best": best,
                         "forgetting": forgetting, "learning_curve_area": area})
    sign = [1 if u else -1 for u in up]
    forgettings = [p["forgetting"] for p in per_task if p["forgetting"] is not None]
    return {
        "average_accuracy": sum(r[t - 1]) / t,
        "average_forgetting": sum(forgettings) / len(forgettings) if forgettings else None,
        "backward_transfer": (sum(sign[j] * (r[t - 1][j] - r[j][j]) for j in range(t - 1)) / (t - 1)
                              if t > 1 else None),
        "forward_transfer": (sum(sign[j] * (r[j - 1][j] - init[j]) for j in range(1, t)) / (t - 1)
                             if t > 1 else None),
        "average_learning_curve_area": sum(p["learning_curve_area"] for p in per_task) / t,
        "per_task": per_task,
    }


def close(got, want) -> bool:
    return got is None if want is None else got == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_summary_equals_the_brute_force_reference(seed):
    rng = random.Random(seed)
    t = 1 + seed % 5
    up = [rng.random() < 0.5 for _ in range(t)]
    r = [[round(rng.uniform(0, 1) if up[j] else rng.uniform(1, 80), 3) for j in range(t)] for _ in range(t)]
    init = [round(rng.uniform(0, 1) if up[j] else rng.uniform(1, 80), 3) for j in range(t)]
    got = metrics.summarize(r, init, up, [f"t{j}" for j in range(t)])
    want = reference(r, init, up)
    for key in ("average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer",
                "average_learning_curve_area"):
        assert close(got[key], want[key]), key
    assert [row["task"] for row in got["per_task"]] == [f"t{j}" for j in range(t)]
    for j, (g, w) in enumerate(zip(got["per_task"], want["per_task"], strict=True)):
        for key, value in w.items():
            assert close(g[key], value), (j, key)
    # the plain functions agree with the summary
    assert metrics.forgetting_per_task(r, up) == [row["forgetting"] for row in got["per_task"]]
    assert metrics.learning_curve_area(r, init) == [row["learning_curve_area"] for row in got["per_task"]]
