"""When a run checkpoints, and what one holds: at the end of every task, and inside a task every
``checkpoint.every_n_steps`` steps or automatically (at most ~2% of the time; never with ``mid_task: false``).
How a checkpoint is laid out on disk is checkpoint.py's."""

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


class CheckpointPolicy:
    """When to checkpoint inside a task (``due``), and writing one (``save``): weights, best weights, run state,
    loop state, strategy state, logged values, RNG (distributed: every rank together, each writing its shards)."""

    def __init__(self, cfg: CheckpointConfig, parts: RunParts) -> None:
        self.cfg, self.parts = cfg, parts
        self.last_time, self.last_cost = time.perf_counter(), None
        self.best_in: tuple[dict[str, torch.Tensor], Path] | None = None  # best weights and a checkpoint holding them

    def due(self, step: int) -> bool:
        if not (self.cfg.enabled and self.cfg.mid_task):
            return False
        if self.cfg.every_n_steps is not None:
            return step % self.cfg.every_n_steps == 0
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
