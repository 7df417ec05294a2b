"""The training bars of a run's console (``TrainingBars``): in a terminal, one live bar per task that moves at every
optimizer step (its loss, speed and what strategies logged are refreshed every ``train.log_every`` steps, when the
loop reads them from the device); in a console that is not a terminal (a log file, Slurm's output), no live display
at all but one whole line per task, printed when the task's training ends, so that the file reads in the order
things happened (``[1/3] color · epoch 1/1 · 8/8 steps · loss 4.693 · 6,148 tok/s · 0.5 s``), before the
evaluation line of the stage that follows."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


def format_extras(extras: dict[str, float]) -> str:
    """Logged values for the progress bar, compactly: ``ewc_penalty 0.12 · buffer_examples 64``."""
    return " · ".join(f"{name} {value:.3g}" for name, value in extras.items())


class TrainingBars:
    """The run's training bars, one per task (``add``); a context manager around the task loop."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal and not console.quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(),
            TextColumn("{task.fields[extras]}"), console=console, transient=False,
        ) if self.live else None

    def __enter__(self) -> TrainingBars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.progress is not None:
            self.progress.stop()

    def add(self, label: str) -> TaskBar:
        return TaskBar(self, label)


class TaskBar:
    """One task's bar: ``start`` (its steps), ``step`` after every optimizer step, ``report`` at every loss read,
    ``finish`` when the task's training ends (a console that is not a terminal gets its one line then)."""

    def __init__(self, bars: TrainingBars, label: str) -> None:
        self.bars, self.label, self.epochs = bars, label, 0
        self.total: int | None = None
        self.completed, self.epoch = 0, 0
        self.fields = {"loss": "-", "speed": "-", "extras": ""}
        self.started = time.perf_counter()
        self.id: TaskID | None = None
        if bars.progress is not None:
            self.id = bars.progress.add_task(label, total=None, **self.fields)

    def _update(self, **fields: object) -> None:
        if self.id is not None:
            self.bars.progress.update(self.id, completed=self.completed, total=self.total,  # type: ignore[union-attr]
                                      description=self._description(), **fields)

    def _description(self) -> str:
        return f"{self.label} · epoch {self.epoch}/{self.epochs}" if self.epoch else self.label

    def start(self, total: int, epochs: int, step: int) -> None:
        self.total, self.epochs, self.completed = total, epochs, step
        self._update()

    def step(self, step: int, epoch: int) -> None:
        """After an optimizer step: the bar moves (no device read: the loss shown is the latest one read)."""
        self.completed, self.epoch = step, epoch
        self._update()

    def report(self, step: int, epoch: int, loss: float, tokens_per_s: float, extras: str) -> None:
        self.completed, self.epoch = step, epoch
        self.fields = {"loss": f"{loss:.3f}", "speed": f"{tokens_per_s:,.0f}", "extras": extras}
        self._update(**self.fields)

    def finish(self) -> None:
        """The task's training ended: a console that is not a terminal gets its line, whole (never cut)."""
        if self.bars.live or self.bars.console.quiet:
            return
        fields, seconds = self.fields, time.perf_counter() - self.started
        parts = [self._description(), f"{self.completed}/{self.total} steps", f"loss {fields['loss']}",
                 f"{fields['speed']} tok/s", f"{seconds:.1f} s", fields["extras"]]
        self.bars.console.print(escape(" · ".join(p for p in parts if p)), soft_wrap=True)
