"""When a run checkpoints within a task (engine/checkpoint_policy.py): by default (``mid_task: auto``) only in a
long task (estimated >= LONG_TASK_S from its steps so far) or every ``every_n_steps``; ``true`` within every task
once the automatic interval passed; ``false`` never. The defaults keep one checkpoint."""

from __future__ import annotations

import time

import pytest

from cl_runner.config.schema import CheckpointConfig
from cl_runner.engine import checkpoint_policy
from cl_runner.engine.checkpoint_policy import LONG_TASK_S, CheckpointPolicy


def due_at(monkeypatch, cfg: CheckpointConfig, seconds_per_step: float, step: int, total: int = 100) -> bool:
    clock = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    policy = CheckpointPolicy(cfg, parts=None)
    policy.start_task(0, total)
    clock[0] += seconds_per_step * step
    return policy.due(step)


def test_defaults_keep_one_checkpoint_and_checkpoint_within_long_tasks_only(monkeypatch):
    cfg = CheckpointConfig()
    assert (cfg.keep_last, cfg.mid_task, cfg.every_n_steps) == (1, "auto", None)
    short = LONG_TASK_S / 100 * 0.9  # 100 steps of this: 90% of a long task
    assert not due_at(monkeypatch, cfg, short, 50)  # 20+ minutes since the last checkpoint, but a short task
    assert due_at(monkeypatch, cfg, LONG_TASK_S / 100 * 1.1, 50)
    assert not due_at(monkeypatch, cfg, LONG_TASK_S, 0)  # no step timed yet


@pytest.mark.parametrize(("mid_task", "every", "expected"), [
    (True, None, True), (False, None, False), ("auto", 5, True), ("auto", 6, False), (False, 5, False)])
def test_explicit_settings(monkeypatch, mid_task, every, expected):
    cfg = CheckpointConfig(mid_task=mid_task, every_n_steps=every)
    assert due_at(monkeypatch, cfg, 1.0, 35) is expected  # a 100 s task, 35 s after the task started


def test_mid_task_takes_auto_true_or_false():
    assert CheckpointConfig(mid_task="sometimes").errors("checkpoint") == [
        "checkpoint.mid_task: expected auto, true or false, got 'sometimes'"]
    assert checkpoint_policy.AUTO_CHECKPOINT_MIN_S < LONG_TASK_S
