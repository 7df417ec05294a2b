"""The task loop of one process (``SequenceRun``): score the init row, then for each remaining task train it
(loop.py), score the sequence, write the row and checkpoint; its progress bar (bars.py), history lines and stop
requests (``_TaskCallbacks``); and each task's own settings (``for_task``)."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

from rich.console import Console

from cl_runner.config.schema import TrainConfig
from cl_runner.config.task_overrides import task_options
from cl_runner.core import dist
from cl_runner.core.files import write_atomic
from cl_runner.engine.assembly import RunParts, sequence_scorer
from cl_runner.engine.bars import TaskBar, TrainingBars, format_extras
from cl_runner.engine.checkpoint_policy import CheckpointPolicy
from cl_runner.engine.loop import Boundary, EpochRecord, LoopCallbacks, TaskRun, train_task
from cl_runner.engine.run_state import RunState
from cl_runner.engine.runtime import StopRequest, stop_signals
from cl_runner.engine.takeaway import save_stage
from cl_runner.models.load import parameter_counts
from cl_runner.outputs import cost
from cl_runner.outputs.predictions import PredictionWriter
from cl_runner.outputs.results import RunWriter
from cl_runner.trackers.fanout import Trackers


class SequenceRun:
    """The task loop of one process: score the init row, then train and score each remaining task."""

    def __init__(self, parts: RunParts, state: RunState, writer: RunWriter, policy: CheckpointPolicy,
                 trackers: Trackers | None = None) -> None:
        self.parts, self.state, self.writer, self.policy = parts, state, writer, policy
        self.trackers = trackers or Trackers([])  # experiment trackers (cl_runner/trackers/), rank 0
        self.scoring = sequence_scorer(parts)
        self.predictions = PredictionWriter(  # eval.save_predictions: predictions/<stage>/<task>.jsonl
            parts.run_dir, parts.cfg.eval.save_predictions, f"after_{parts.names[-1]}", self.scoring.tasks,
            lambda j: self.scoring.eval_set(j, "test").test, parts.ctx.decode, parts.world.main)
        self.stop = StopRequest()

    def train(self, console: Console, task_resume: dict[str, Any] | None) -> None:
        self.scoring.progress.attach(console)  # evaluation's progress bars (rank 0's console; others are quiet)
        with stop_signals(self.stop), TrainingBars(console) as bars:
            if not self.state.stages:
                self.add_stage("init", self.scoring.score())
            for i in range(self.state.next_task, len(self.parts.tasks)):
                self.train_task(i, task_resume, bars)
                task_resume = None

    def train_task(self, i: int, resume: dict[str, Any] | None, bars: TrainingBars) -> None:
        """Train task ``i`` (continuing it from ``resume``), score the sequence, checkpoint."""
        parts, state, name = self.parts, self.state, self.parts.names[i]
        parts.ctx.task_index = i  # the task hooks and scoring see from here on
        callbacks = _TaskCallbacks(self, bars.add(f"[{i + 1}/{len(parts.tasks)}] {name}"))
        task_started = time.perf_counter()
        records = train_task(TaskRun(parts.ctx, parts.strategy, parts.encoded[i].train, for_task(parts, i),
                                     self.scoring.validate, parts.scaler, resume, callbacks, parts.cfg.distributed))
        callbacks.bar.finish()  # a log file: the task's line, before the stage's evaluation line
        state.history.extend(asdict(r) for r in records)
        state.wall_time_per_task_s[name] = round(
            state.wall_time_per_task_s.get(name, 0.0) + time.perf_counter() - task_started, 3)
        for file_name, text in parts.ctx.artifacts.items() if parts.world.main else ():  # e.g. pseudo-examples
            write_atomic(parts.run_dir / file_name, text)
        self.add_stage(f"after_{name}", self.scoring.score_after(i))
        if parts.cfg.save.every_task and i < len(parts.tasks) - 1:  # the last one is model/ (finish)
            saved = save_stage(parts, f"after_{name}", final=False)  # before the checkpoint: a resume rewrites it
            state.info.setdefault("saved_models", {})[f"after_{name}"] = saved
        state.next_task = i + 1
        if parts.cfg.checkpoint.enabled:
            self.policy.save(state, None, None)
        if self.agree(False)[0]:
            self.stop.check(parts.run_dir)

    def agree(self, due: bool, sync: bool = True) -> tuple[bool, bool]:
        """(stop, checkpoint now), the same on every rank. Ranks compare notes at ``sync`` points only (every
        ``train.log_every`` steps, epoch and task ends; a CPU collective each): a signal reaching any rank stops
        them all there (Slurm signals the ranks at slightly different moments), and rank 0's clock decides a
        time-based checkpoint. Between sync points only a step-count checkpoint (``every_n_steps``) is taken."""
        world = self.parts.world
        if not world.distributed:
            return self.stop.signum is not None, due
        if not sync:
            return False, due and self.policy.cfg.every_n_steps is not None
        signum, due = dist.all_reduce_max([self.stop.signum or 0, float(due and world.main)])
        if signum and self.stop.signum is None:
            self.stop.signum = int(signum)
        return self.stop.signum is not None, bool(due)

    def add_stage(self, stage: str, results: list[dict]) -> None:
        self.predictions.write(stage, self.scoring.last_examples)  # before the row: a row's files are on disk
        parts = self.parts
        monitored = parts.monitors.score(self.scoring.scorer, parts.strategy, parts.ctx, parts.tokenizer,
                                         None if stage == "init" else parts.ctx.task_index)
        self.writer.add_row([r["score"] for r in results] + [m["score"] for m in monitored.values()])
        self.state.add_stage(stage, results)
        if monitored:  # stages[i]["monitors"]: the monitors' columns (cl_runner/scoring/monitors.py)
            self.state.stages[-1]["monitors"] = monitored
        self.state.info.setdefault("eval_seconds_per_stage", {})[stage] = self.scoring.take_timing()
        self.state.info["cost"] = cost.run_cost(self.state.info, self.state.history,
                                                parameter_counts(self.parts.model)["total"], self.parts.device)
        self.writer.write_metrics(self.state.to_metrics())
        self.trackers.on_stage(stage, self.state.rows())


def for_task(parts: RunParts, i: int) -> TrainConfig:
    """Task ``i``'s own settings, the same on every (re)start: its strategy options as values on the context
    (``ctx.options``; ``strategy.cfg`` stays the run's), and the training settings with its epochs."""
    cfg, task = parts.cfg, parts.cfg.tasks.tasks[i]
    parts.ctx.options = task_options(parts.strategy.cfg, task.strategy_overrides)
    return cfg.train if task.epochs is None else replace(cfg.train, epochs=task.epochs)


class _TaskCallbacks(LoopCallbacks):
    """The run's side of one task's loop: progress bar, history lines, checkpoints and stop requests."""

    def __init__(self, run: SequenceRun, bar: TaskBar) -> None:
        self.run, self.bar = run, bar

    def on_step(self, event: dict[str, Any]) -> None:
        if event["event"] == "task_start":
            parts = self.run.parts
            trainable = self.run.state.info["parameters"].setdefault("trainable_per_task", {})
            trainable[parts.names[parts.ctx.task_index]] = event["trainable"]
            self.bar.start(event["total_steps"], event["epochs"], event["step"])
            self.run.policy.start_task(event["step"], event["total_steps"])
        else:
            mfu = "" if event["mfu"] is None else f"MFU {event['mfu']:.1%} · "
            self.bar.report(event["step"], event["epoch"], event["loss"], event["tokens_per_s"],
                            mfu + format_extras(event["extras"]))
        self.run.trackers.on_step(event, self.run.parts.ctx)

    def on_progress(self, step: int, epoch: int) -> None:
        self.bar.step(step, epoch)

    def on_epoch(self, record: EpochRecord) -> None:
        self.run.writer.add_history(asdict(record))
        self.run.trackers.on_epoch(record)

    def on_boundary(self, boundary: Boundary) -> None:
        run = self.run
        sync = boundary.kind == "epoch" or boundary.loop.step % run.parts.cfg.train.log_every == 0
        stop, due = run.agree(boundary.kind == "step" and run.policy.due(boundary.loop.step), sync)
        if stop or due:
            run.policy.save(run.state, boundary.state_dict(), boundary.best_state)
        if stop:
            run.stop.check(run.parts.run_dir)
