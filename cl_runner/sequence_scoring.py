"""Scoring the task sequence: each task in turn between the strategy's eval hooks (matrix rows, validation)."""

from __future__ import annotations

from dataclasses import dataclass

from cl_runner.evaluate import Scorer, score_task
from cl_runner.strategies.base import Context, Strategy
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask


@dataclass
class SequenceScorer:
    """Scores any tasks of the sequence with the current model, as the strategy wants each one scored."""

    scorer: Scorer
    tasks: list[Task]
    encoded: list[EncodedTask]
    strategy: Strategy
    ctx: Context

    def score(self, split: str = "test", indices: list[int] | None = None) -> list[dict]:
        """One evaluation pass: ``before_eval`` then the score of each task (all by default), then ``after_eval``."""
        results = []
        for j in range(len(self.tasks)) if indices is None else indices:
            self.strategy.before_eval(self.ctx, j)
            task = self.tasks[j]
            results.append(score_task(self.scorer, self.encoded[j], task.metric, task.stop, task.labels, split))
        self.strategy.after_eval(self.ctx)
        return results

    def validate(self, indices: list[int]) -> float:
        """The mean validation score of tasks ``indices``, signed so that higher is better (picks the best epoch)."""
        scores = self.score("validation", indices)
        signed = [s["score"] if self.tasks[j].higher_is_better else -s["score"]
                  for j, s in zip(indices, scores, strict=True)]
        return sum(signed) / len(signed)
