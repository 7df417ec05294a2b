"""When a run checkpoints, and what one holds: at the end of every task, and inside a task every
``checkpoint.every_n_steps`` steps or automatically (at most ~2% of the time; never with ``mid_task: false``).
How a checkpoint is laid out on disk is checkpoint.py's.

Disk. A mid-task checkpoint holds the weights, AdamW's two moments and possibly the best weights (3-4 model
copies); a task-end one the weights and the strategy's state. So by default (``mid_task: auto``) automatic
checkpoints are written inside a task only when the task is long: its estimated length (the mean time of its
steps so far times its steps) is at least ``LONG_TASK_S``, where a stop would lose more than a checkpoint costs
to keep. ``every_n_steps`` (an explicit request) and ``mid_task: true`` checkpoint within every task. With
``keep_last: 1`` (the default) a run's disk is one checkpoint, near one model copy between tasks."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cl_runner.config.schema import CheckpointConfig
from cl_runner.core import dist
from cl_runner.core.rng import rng_state
from cl_runner.engine.assembly import RunParts
from cl_runner.engine.checkpoint import checkpoint_bytes, has_best, next_number, save_checkpoint
from cl_runner.engine.loop import read_extras
from cl_runner.engine.run_state import RunState

AUTO_CHECKPOINT_FACTOR = 50  # automatic checkpoints: interval >= 50 x the cost of one, i.e. < 2% overhead
AUTO_CHECKPOINT_MIN_S = 30.0
LONG_TASK_S = 1800.0  # mid_task auto: automatic checkpoints within tasks estimated to take at least 30 minutes


class CheckpointPolicy:
    """When to checkpoint inside a task (``due``), and writing one (``save``): weights, best weights, run state,
    loop state, strategy state, logged values, RNG (distributed: every rank together, each writing its shards)."""

    def __init__(self, cfg: CheckpointConfig, parts: RunParts) -> None:
        self.cfg, self.parts = cfg, parts
        self.last_time, self.last_cost = time.perf_counter(), None
        self.best_in: tuple[dict[str, torch.Tensor], Path] | None = None  # best weights and a checkpoint holding them
        self.task: tuple[float, int, int] | None = None  # the task's (start time, first step, total steps)

    def start_task(self, step: int, total_steps: int) -> None:
        """A task's loop starts (or continues) at ``step`` of ``total_steps``: the clock of ``long_task``."""
        self.task = (time.perf_counter(), step, total_steps)

    def long_task(self, step: int) -> bool:
        """Whether the running task is estimated to take at least ``LONG_TASK_S`` (from its steps so far)."""
        if self.task is None or step <= self.task[1]:
            return False
        started, first, total = self.task
        return (time.perf_counter() - started) / (step - first) * total >= LONG_TASK_S

    def due(self, step: int) -> bool:
        if not self.cfg.enabled or self.cfg.mid_task is False:
            return False
        if self.cfg.every_n_steps is not None:
            return step % self.cfg.every_n_steps == 0
        if self.cfg.mid_task == "auto" and not self.long_task(step):
            return False
        cost = self.last_cost if self.last_cost is not None else 0.0
        interval = max(AUTO_CHECKPOINT_FACTOR * cost, AUTO_CHECKPOINT_MIN_S)
        return time.perf_counter() - self.last_time >= interval

    def save(self, state: RunState, task: dict[str, Any] | None, best: dict[str, torch.Tensor] | None) -> None:
        """Write the next checkpoint; ``task`` is the loop's ``Boundary.state_dict()`` (None between tasks). Its
        number is 1 + the highest the run has used, which is also ``checkpoints.count``: the checkpoints written
        over the run's life (the checkpoint holds its own count, so a resume keeps it)."""
        number = dist.broadcast_object(next_number(self.parts.run_dir, state.checkpoint_seq))  # rank 0's count
        saved = replace(state, checkpoint_seq=number, elapsed_s=state.elapsed(),
                        checkpoints={**state.checkpoints, "count": number})
        payload = {"run": saved.to_checkpoint(), "task": task, "strategy": self.parts.strategy.state_dict(),
                   "extras": read_extras(self.parts.ctx.extras), "rng": rng_state()}
        optimizer = self.parts.ctx.optimizer if task is not None else None  # the task's (distributed: shards)
        # the loop replaces its best-weights dict when an epoch does better, so the same dict = the same weights
        best_from = self.best_in[1] if self.best_in is not None and self.best_in[0] is best else None
        path, cost = save_checkpoint(self.parts.run_dir, number, self.parts.model, payload, best, self.cfg.keep_last,
                                     optimizer, best_from)
        self.best_in = (best, path) if best is not None and has_best(path) else None
        self.last_time, self.last_cost = time.perf_counter(), cost
        state.checkpoint_seq, state.elapsed_s = number, saved.elapsed_s
        state.checkpoints = {"count": number, "last_seconds": round(cost, 4),
                             "bytes": checkpoint_bytes(path)}
