"""Scoring the task sequence: each task in turn between the strategy's eval hooks (matrix rows, validation).

Which tasks a stage scores (``eval.full_every``): every task after every N-th task and after the last one; the
stages in between score only the task just trained and the next one, which is all that average accuracy, BWT
and FWT read, and leave the other cells of the matrix empty (``UNSCORED``).

Which examples: ``eval.max_examples`` caps every split of every task at a seeded sample (the same at every stage,
on every rank and after a resume), except tasks with their own ``max_eval_examples`` (applied when loading);
validation is then capped again at ``train.max_validation_examples``. Each pass shows a progress bar on rank 0
(``EvalProgress``) and records its seconds (``last_seconds``; validation passes add up in ``validation_seconds``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace

from rich.console import Console
from rich.errors import LiveError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from cl_runner.scoring.evaluate import Scorer, score_task
from cl_runner.strategies.base import Context, Strategy
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask, EvalItem

UNSCORED = {"score": None}  # a cell of a stage that the schedule does not score


def stage_tasks(trained: int, n_tasks: int, full_every: int) -> list[int]:
    """The tasks scored after training task ``trained`` (0-based) of ``n_tasks``."""
    if (trained + 1) % full_every == 0 or trained == n_tasks - 1:
        return list(range(n_tasks))
    return [j for j in (trained, trained + 1) if j < n_tasks]


def sample(items: list[EvalItem], cap: int | None, seed: int | str) -> list[EvalItem]:
    """At most ``cap`` of ``items``: a sample seeded by ``seed``, in the items' order (all of them when fewer)."""
    if cap is None or len(items) <= cap:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), cap))
    return [items[i] for i in keep]


class TimeLeft(ProgressColumn):
    """Time left at the pass's mean pace so far, from its first batch on (rich's own column needs two updates
    within 30 s, which a slow model's batches never give it)."""

    def render(self, task) -> Text:
        if not task.completed or not task.total or task.elapsed is None:
            return Text("-:--:--", style="progress.remaining")
        left = int(task.elapsed * (task.total - task.completed) / task.completed)
        return Text(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}", style="progress.remaining")


class EvalProgress:
    """The bar of one evaluation pass on the run's console, below the training bars: examples scored out of
    the pass's total (all tasks), moving after every batch, the task being scored, elapsed and remaining time
    (``TimeLeft``). Once a stage's pass is done the bar gives way to one line (``eval after city · 3 tasks · 192
    examples · 2.1 s``); a validation pass's bar just disappears. A console that is not a terminal (a log file) gets
    the stage lines only, whole, in the order they happen (the training bars' lines are bars.py's). Nothing is shown
    until ``attach`` gives it a console (rank 0's; the other ranks' are quiet)."""

    def __init__(self) -> None:
        self.console: Console | None = None
        self._bar: Progress | None = None
        self._label = self._summary = ""

    def attach(self, console: Console) -> None:
        self.console = None if console.quiet else console

    def start(self, label: str, total: int, n_tasks: int, keep: bool) -> None:
        self._label = label
        self._summary = f"{label} · {n_tasks} task{'s' * (n_tasks != 1)} · {total} examples" if keep else ""
        if self.console is None or not self.console.is_terminal:  # a log file gets the summary line only
            return
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("examples"), TimeElapsedColumn(), TextColumn("left"), TimeLeft(),
                       console=self.console, transient=True)
        try:
            bar.start()
        except LiveError:  # rich < 14 has no nested live displays: no bar under the training bars
            return
        self._bar = bar
        bar.add_task(label, total=total)

    def task(self, name: str, k: int, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._bar.task_ids[0], description=f"{self._label} · {name} ({k}/{n})")

    def advance(self, examples: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._bar.task_ids[0], examples)

    def stop(self, seconds: float) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.console is not None and self._summary:
            self.console.print(escape(f"{self._summary} · {seconds:.1f} s"), soft_wrap=True)  # whole in a log file


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
    max_examples: list[int | None] = field(default_factory=list)  # per task (eval.max_examples); [] = no cap
    progress: EvalProgress = field(default_factory=EvalProgress)
    last_seconds: float = 0.0  # the latest pass (score)
    validation_seconds: float = 0.0  # validation passes since ``take_timing``
    last_examples: dict[int, list[dict] | None] = field(default_factory=dict)  # latest test pass: task -> records
    _sets: dict[tuple[int, str], EncodedTask] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.scorer.on_examples = self.progress.advance

    def score(self, split: str = "test", indices: list[int] | None = None, label: str = "eval init") -> list[dict]:
        """One evaluation pass: ``before_eval`` then the score of each task (all by default), then ``after_eval``."""
        started = time.perf_counter()
        indices = list(range(len(self.tasks))) if indices is None else indices
        sets = [self.eval_set(j, split) for j in indices]
        total = sum(len(s.test if split == "test" else s.validation) for s in sets)
        self.progress.start(label, total, len(indices), keep=split == "test")
        results, examples = [], split == "test"  # a test pass keeps each example's record (predictions.py)
        self.last_examples = {} if examples else self.last_examples
        try:
            for k, (j, encoded) in enumerate(zip(indices, sets, strict=True)):
                self.strategy.before_eval(self.ctx, j)
                task = self.tasks[j]
                self.progress.task(task.name, k + 1, len(indices))
                scorer = replace(self.scorer, batch_size=task.eval_batch_size or self.scorer.batch_size,
                                 examples=examples)
                results.append(score_task(scorer, encoded, task.metric, task.stop, task.labels, split,
                                          task.max_new_tokens, task.normalizer, task.answer_pattern))
                if examples:
                    self.last_examples[j] = results[-1].pop("examples", None)
            self.strategy.after_eval(self.ctx)
        finally:
            self.last_seconds = time.perf_counter() - started
            self.progress.stop(self.last_seconds)
        return results

    def score_after(self, trained: int) -> list[dict]:
        """The matrix row after task ``trained``: one result per task, ``UNSCORED`` where the schedule skips it."""
        indices = stage_tasks(trained, len(self.tasks), self.full_every)
        label = f"eval after {self.tasks[trained].name}"
        scored = dict(zip(indices, self.score(indices=indices, label=label), strict=True))
        return [scored.get(j, dict(UNSCORED)) for j in range(len(self.tasks))]

    def eval_set(self, j: int, split: str) -> EncodedTask:
        """Task ``j`` with the examples of ``split`` that are scored (see the module's docstring); cached, so
        every stage and epoch scores the same ones."""
        if (j, split) not in self._sets:
            task = self.encoded[j]
            cap = self.max_examples[j] if self.max_examples else None
            if split == "test":
                self._sets[j, split] = replace(task, test=sample(task.test, cap, f"eval-test-{task.name}-{self.seed}"))
            else:
                items = sample(task.validation, cap, f"eval-validation-{task.name}-{self.seed}")
                items = sample(items, self.max_validation_examples, self.seed * 1_000_003 + j)
                self._sets[j, split] = replace(task, validation=items)
        return self._sets[j, split]

    def validation_set(self, j: int) -> EncodedTask:
        """Task ``j`` with the validation examples that are scored: the same sample every epoch (and on resume)."""
        return self.eval_set(j, "validation")

    def validate(self, indices: list[int]) -> float:
        """The mean validation score of tasks ``indices``, signed so that higher is better (picks the best epoch)."""
        scores = self.score("validation", indices, label="validate")
        self.validation_seconds += self.last_seconds
        signed = [s["score"] if self.tasks[j].higher_is_better else -s["score"]
                  for j, s in zip(indices, scores, strict=True)]
        return sum(signed) / len(signed)

    def take_timing(self) -> dict[str, float]:
        """A stage's seconds for metrics.json: ``eval``, its test evaluation (the latest pass), and ``validation``,
        the validation passes since the previous stage (in the task just trained); the latter restarts at zero."""
        timing = {"eval": round(self.last_seconds, 3), "validation": round(self.validation_seconds, 3)}
        self.validation_seconds = 0.0
        return timing
