"""train.grad_accum changes how a step is computed, never what is learnt: for every shipped strategy, 1 and 4
micro-batches per optimizer step at the same batch_size give the same accuracy matrix and (up to float rounding)
the same training losses. Dropout is off: its masks are drawn per micro-batch (see cl_runner/engine/loop.py)."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_config, run_quietly
from rich.console import Console
from strategy_runs import EPOCHS, STRATEGIES, TASKS, small_run

from cl_runner.engine.checkpoint import list_checkpoints
from cl_runner.engine.loop import split, weighted
from cl_runner.engine.run import run
from cl_runner.strategies.base import MicroBatch
from cl_runner.strategies.lamol import generation_share


def outcome(tmp_path: Path, strategy: str, accum: int) -> tuple[list, list[float]]:
    cfg = small_run(strategy, f"train.grad_accum={accum}")
    run_dir = tmp_path / f"{strategy}-{accum}"
    result = run_quietly(cfg, run_dir)
    rows = [[stage["scores"][n]["score"] for n in result["tasks"]] for stage in result["stages"]]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return rows, [h["train_loss"] for h in history]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grad_accum_gives_the_same_matrix_for_every_strategy(tmp_path, strategy):
    rows, losses = outcome(tmp_path, strategy, 1)
    assert len(losses) == len(TASKS) * EPOCHS and all(math.isfinite(x) for x in losses)
    # 4 micro-batches of 2 and, at each epoch's end, of 1 example: the unevenest split (2 is an even one, tested
    # on the step batches themselves below)
    other_rows, other_losses = outcome(tmp_path, strategy, 4)
    assert other_rows == rows
    assert other_losses == pytest.approx(losses, rel=1e-3, abs=1e-6)


def test_there_is_one_case_per_shipped_strategy():
    from cl_runner.strategies.registry import builtin_strategies

    assert set(STRATEGIES) == set(builtin_strategies()) and "replay" in STRATEGIES and "merge" in STRATEGIES


def example(n_targets: int) -> dict:
    return {"input_ids": [5] * (n_targets + 2), "labels": [-100, -100] + [7] * n_targets, "task_id": 0}


def test_step_batches_are_split_evenly_and_weighted_by_target_tokens():
    batch = [example(n) for n in (1, 2, 3, 4, 5)]
    micro = split(batch, 4)
    assert [len(m) for m in micro] == [2, 1, 1, 1] and sum(micro, []) == batch
    assert [len(m) for m in split(batch[:2], 4)] == [1, 1]  # never an empty micro-batch
    assert [w for _, w in weighted(micro)] == [3 / 15, 3 / 15, 4 / 15, 5 / 15]
    assert [w for _, w in weighted([[example(0)], [example(0)]])] == [0.5, 0.5]  # no target at all: equal shares


def test_lamol_generation_loss_adds_up_to_the_mean_over_the_whole_step():
    step = [example(1), example(6), example(2), example(3), example(9)]  # unequal real/target token ratios
    nll = {id(e): float(i + 1) * len(e["input_ids"]) for i, e in enumerate(step)}  # summed generation NLL
    total = 0.0
    for examples, weight in weighted(split(step, 2)):
        mean = sum(nll[id(e)] for e in examples) / sum(len(e["input_ids"]) for e in examples)  # causal_lm_loss
        ctx = SimpleNamespace(micro=MicroBatch(examples, step, weight))
        total += weight * generation_share(ctx) * mean  # what the loop backpropagates
    assert total == pytest.approx(sum(nll.values()) / sum(len(e["input_ids"]) for e in step))
    assert generation_share(SimpleNamespace(micro=MicroBatch(step, step, 1.0))) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["replay", "lamol"])
def test_resume_inside_an_epoch_with_micro_batches_is_exact(tmp_path, strategy):
    """Checkpoints after every step; resuming from one in the middle of task 2 (buffer or pseudo-examples in
    use) reproduces the uninterrupted run: same matrix, same history."""
    run_dir = tmp_path / "run"
    cfg = make_config(f"strategy={strategy}", "train.epochs=2", "train.batch_size=8", "train.grad_accum=4",
                      "train.keep_best=false", "checkpoint.every_n_steps=1", "checkpoint.keep_last=1000", tasks=TASKS)
    expected = run_quietly(cfg, run_dir)
    history = (run_dir / "history.jsonl").read_text().splitlines()
    checkpoints = list_checkpoints(run_dir)
    saved = {p: torch.load(p / "state.pt", weights_only=True) for p in checkpoints}
    inside = [p for p, state in saved.items() if state["task"] is not None and state["run"]["next_task"] == 1
              and state["task"]["loop"]["batches_done"] == 1]  # task 2, after the first step of an epoch
    for newer in checkpoints[checkpoints.index(inside[0]) + 1 :]:
        shutil.rmtree(newer)
    resumed = run(cfg, run_dir, console=Console(file=io.StringIO()), resume=True)
    assert [s["scores"] for s in resumed["stages"]] == [s["scores"] for s in expected["stages"]]
    assert stable(history) == stable((run_dir / "history.jsonl").read_text().splitlines())


def stable(lines: list[str]) -> list[dict]:
    timings = ("seconds", "tokens_per_s", "target_tokens_per_s", "validation_seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in lines]
