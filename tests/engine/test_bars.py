"""Progress that moves: the training bar after every optimizer step (the loss still read every log_every steps),
the evaluation bar after every batch with a time-left estimate from the first one; a console that is not a
terminal gets one whole line per task, when the task ends, and no live display."""

import io
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from rich.console import Console
from tiny_loop import context, examples, tiny_model

from cl_runner.config.schema import EvalConfig, TrainConfig
from cl_runner.engine.bars import TrainingBars
from cl_runner.engine.loop import LoopCallbacks, TaskRun, train_task
from cl_runner.scoring.evaluate import Scorer
from cl_runner.scoring.sequence import EvalProgress, SequenceScorer, TimeLeft
from cl_runner.strategies.base import Strategy
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask, EvalItem


class Bar(LoopCallbacks):
    """A real terminal bar, its position written down at every call (as a slow model's user would see it)."""

    def __init__(self, console: Console) -> None:
        self.bars = TrainingBars(console)
        self.bar = self.bars.add("[1/1] a")
        self.seen: list[tuple[str, int]] = []

    def on_step(self, event):
        if event["event"] == "task_start":
            self.bar.start(event["total_steps"], event["epochs"], event["step"])
        else:
            self.bar.report(event["step"], event["epoch"], event["loss"], event["tokens_per_s"], "")
            self.seen.append(("loss", event["step"]))

    def on_progress(self, step, epoch):
        self.bar.step(step, epoch)
        task = self.bars.progress.tasks[0]
        self.seen.append(("bar", int(task.completed)))


def test_the_training_bar_moves_at_every_step_while_the_loss_is_read_every_log_every_steps():
    data = examples(12)
    bar = Bar(Console(file=io.StringIO(), force_terminal=True, width=120))
    with bar.bars:
        train_task(TaskRun(context(tiny_model(), data), Strategy(), data,
                           TrainConfig(epochs=2, batch_size=4, keep_best=False, log_every=4),
                           validate=lambda idx: 0.0, callbacks=bar))
    assert [s for kind, s in bar.seen if kind == "bar"] == [1, 2, 3, 4, 5, 6]  # 3 steps per epoch, 2 epochs
    assert [s for kind, s in bar.seen if kind == "loss"] == [3, 4, 6]  # ends of epochs and the log_every mark
    assert bar.bars.progress.tasks[0].description == "[1/1] a · epoch 2/2"


def test_a_console_that_is_no_terminal_gets_one_whole_line_per_task_when_it_ends_and_nothing_else():
    out = io.StringIO()
    console = Console(file=out, width=40)  # a log file: rich would cut or wrap at 40 columns
    with TrainingBars(console) as bars:
        bar = bars.add("[1/2] a_task_name_much_longer_than_the_console_is_wide")
        bar.start(6, 2, 0)
        for step in range(1, 7):
            bar.step(step, 1 + (step > 3))
        bar.report(6, 2, 1.23456, 4321.0, "ewc_penalty 0.5")
        assert out.getvalue() == ""  # nothing before the task's end (and never a bar)
        bar.finish()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("[1/2] a_task_name_much_longer_than_the_console_is_wide · epoch 2/2 · 6/6 steps · "
                           "loss 1.235 · 4,321 tok/s · ")
    assert line.endswith(" s · ewc_penalty 0.5")


def test_the_evaluation_bar_moves_after_every_batch_and_estimates_the_time_left_from_the_first():
    items = [EvalItem(prompt_ids=[3, 4, 5], target_ids=[6, 1], target="") for _ in range(7)]
    task = Task(name="a", metric="perplexity", train=[], validation=[], test=[])
    encoded = EncodedTask(name="a", train=[], validation=items, test=items, label_ids=None)
    model = tiny_model()
    scorer = Scorer(model=model, pad_id=0, eos_id=1, device=torch.device("cpu"), autocast=nullcontext,
                    batch_size=2, cfg=EvalConfig(), decode=str)
    advanced: list[int] = []

    class Recording(EvalProgress):
        def advance(self, examples: int) -> None:
            advanced.append(examples)
            super().advance(examples)

    progress = Recording()
    scoring = SequenceScorer(scorer, [task], [encoded], Strategy(), context(model, []), progress=progress)
    progress.attach(Console(file=io.StringIO(), force_terminal=True, width=120))
    scoring.score()
    assert advanced == [2, 2, 2, 1]  # one update per batch of 2
    first_batch = SimpleNamespace(completed=2, total=8, elapsed=10.0)
    assert TimeLeft().render(first_batch).plain == "0:00:30"
    assert TimeLeft().render(SimpleNamespace(completed=0, total=8, elapsed=1.0)).plain == "-:--:--"
