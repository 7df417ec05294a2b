"""Scoring the task sequence: each task in turn between the strategy's eval hooks (matrix rows, validation).

Which tasks a stage scores (``eval.full_every``): every task after every N-th task and after the last one; the
stages in between score only the task just trained and the next one, which is all that average accuracy, BWT
and FWT read, and leave the other cells of the matrix empty (``UNSCORED``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from cl_runner.evaluate import Scorer, score_task
from cl_runner.strategies.base import Context, Strategy
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask

UNSCORED = {"score": None}  # a cell of a stage that the schedule does not score


def stage_tasks(trained: int, n_tasks: int, full_every: int) -> list[int]:
    """The tasks scored after training task ``trained`` (0-based) of ``n_tasks``."""
    if (trained + 1) % full_every == 0 or trained == n_tasks - 1:
        return list(range(n_tasks))
    return [j for j in (trained, trained + 1) if j < n_tasks]


@dataclass
class SequenceScorer:
    """Scores any tasks of the sequence with the current model, as the strategy wants each one scored."""

    scorer: Scorer
    tasks: list[Task]
    encoded: list[EncodedTask]
    strategy: Strategy
    ctx: Context
    full_every: int = 1  # eval.full_every
    max_validation_examples: int | None = None  # train.max_validation_examples
    seed: int = 0
    _validation_sets: dict[int, EncodedTask] = field(default_factory=dict, repr=False)

    def score(self, split: str = "test", indices: list[int] | None = None) -> list[dict]:
        """One evaluation pass: ``before_eval`` then the score of each task (all by default), then ``after_eval``."""
        results = []
        for j in range(len(self.tasks)) if indices is None else indices:
            self.strategy.before_eval(self.ctx, j)
            task = self.tasks[j]
            encoded = self.encoded[j] if split == "test" else self.validation_set(j)
            results.append(score_task(self.scorer, encoded, task.metric, task.stop, task.labels, split))
        self.strategy.after_eval(self.ctx)
        return results

    def score_after(self, trained: int) -> list[dict]:
        """The matrix row after task ``trained``: one result per task, ``UNSCORED`` where the schedule skips it."""
        indices = stage_tasks(trained, len(self.tasks), self.full_every)
        scored = dict(zip(indices, self.score(indices=indices), strict=True))
        return [scored.get(j, dict(UNSCORED)) for j in range(len(self.tasks))]

    def validation_set(self, j: int) -> EncodedTask:
        """Task ``j`` with at most ``max_validation_examples`` validation items: a seeded sample, the same every
        epoch (and on resume)."""
        task, cap = self.encoded[j], self.max_validation_examples
        if cap is None or len(task.validation) <= cap:
            return task
        if j not in self._validation_sets:
            keep = sorted(random.Random(self.seed * 1_000_003 + j).sample(range(len(task.validation)), cap))
            self._validation_sets[j] = replace(task, validation=[task.validation[i] for i in keep])
        return self._validation_sets[j]

    def validate(self, indices: list[int]) -> float:
        """The mean validation score of tasks ``indices``, signed so that higher is better (picks the best epoch)."""
        scores = self.score("validation", indices)
        signed = [s["score"] if self.tasks[j].higher_is_better else -s["score"]
                  for j, s in zip(indices, scores, strict=True)]
        return sum(signed) / len(signed)
