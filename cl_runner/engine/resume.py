"""Where a run starts: afresh, or (``resume``) from the newest checkpoint that reads back whole and fits the run's
config.yaml (``start_state``, ``restore``); a checkpoint that does not fit is refused before any weight or file
is touched (``misfit``), naming what differs and the config keys edited since."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console

from cl_runner.config.schema import as_dict
from cl_runner.core.errors import CheckpointMismatch
from cl_runner.core.rng import rank_rng, set_rng_state
from cl_runner.engine.assembly import RunParts, run_info
from cl_runner.engine.checkpoint import (
    Checkpoint,
    best_weights,
    load_shards,
    load_strategy_shards,
    load_weights,
    move_aside,
    newest_on_every_rank,
)
from cl_runner.engine.loop import make_optimizer
from cl_runner.engine.run_state import RunState
from cl_runner.engine.weights import weights_mismatch
from cl_runner.outputs.results import RunWriter
from cl_runner.scoring.monitors import matrix_rows

log = logging.getLogger(__name__)


def start_state(parts: RunParts, writer: RunWriter, console: Console, resume: bool,
                started: float) -> tuple[RunState, dict[str, Any] | None]:
    """A fresh run state; with ``resume`` the state of the newest checkpoint that reads back whole (newer damaged
    ones are moved aside), or with none the beginning again. On resume the matrix, history.jsonl and
    metrics.json are rewritten from that state, so no epoch is doubled or lost; a restart after damage first
    moves the earlier results to ``superseded/<n>/``."""
    if not resume:
        return RunState(info=run_info(parts), started=started), None
    checkpoint, damaged = newest_on_every_rank(parts.run_dir) if parts.cfg.checkpoint.enabled else (None, [])
    if checkpoint is not None:
        state, task = restore(parts, checkpoint, started)  # a mismatch raises before anything is written
    else:
        state, task = RunState(info=run_info(parts), started=started), None
    for path, reason in damaged if parts.world.main else ():
        move_aside(path, reason)
    kept = writer.supersede() if damaged and checkpoint is None else None
    writer.set_rows(matrix_rows(state.stages, parts.names, parts.monitors.names))
    writer.set_history(state.history + (task["loop"]["records"] if task else []))
    writer.write_metrics(state.to_metrics())
    if checkpoint is not None:
        console.print(f"resuming from {checkpoint.path} (task {state.next_task + 1}/{len(parts.tasks)})")
    else:
        log.warning("no usable checkpoint in %s: starting the run from the beginning%s", parts.run_dir,
                    f" (the earlier results are kept in {kept})" if kept else "")
    return state, task


def restore(parts: RunParts, checkpoint: Checkpoint, started: float) -> tuple[RunState, dict[str, Any] | None]:
    """Continue from ``checkpoint`` (read and checked by ``read_checkpoint``): the strategy state and the modules
    it re-creates, then, once the weights are known to fit, weights, logged values, RNG. Returns the run state
    and the interrupted task's loop state (None between tasks). A checkpoint that does not fit config.yaml
    raises ``CheckpointMismatch`` before any weight or file is touched. A distributed checkpoint is loaded by
    every rank together (DCP reshards it to this run's process count), the optimizer state through a
    stand-in optimizer built as the loop builds its own."""
    if checkpoint.sharded:
        load_strategy_shards(checkpoint, parts.model)  # the strategy's DTensors, before the strategy sees them
    problem = misfit(parts, checkpoint)
    if problem:
        raise CheckpointMismatch(f"resume: checkpoint {checkpoint.path} does not match "
                                 f"{parts.run_dir / 'config.yaml'} ({problem})")
    saved = checkpoint.state
    task, best = saved["task"], None
    if checkpoint.sharded:
        optimizer = None if task is None else make_optimizer(parts.model, parts.cfg.train, parts.device)
        best = load_shards(checkpoint, parts.model, optimizer)
        task = task if optimizer is None else task | {"optimizer": optimizer.state_dict()}
    else:
        load_weights(checkpoint.path, parts.model)
    best = best_weights(checkpoint, parts.model, best)
    parts.ctx.extras.update(saved["extras"])  # Context.extras: the values logged before the checkpoint
    set_rng_state(rank_rng(saved["rng"]))
    task = None if task is None else task | {"best": best}
    return RunState.from_checkpoint(saved["run"], started), task


def misfit(parts: RunParts, checkpoint: Checkpoint) -> str | None:
    """How an intact checkpoint fails to fit the run config.yaml builds (tasks, strategy state, weight names and
    shapes, compared after the strategy re-created its modules), plus the config keys edited since; or None."""
    info = checkpoint.state["run"]["info"]
    if info.get("tasks") != parts.names:
        problem = f"tasks {info.get('tasks')} in the checkpoint, {parts.names} in config.yaml"
    else:
        problem = (_strategy_misfit(parts, checkpoint.state["strategy"])
                   or weights_mismatch(parts.model, checkpoint.shapes, checkpoint.best_shapes))
    edited = config_changes(info.get("config") or {}, as_dict(parts.cfg))
    if problem and edited:
        problem += f"; edited since: {', '.join(edited[:4])}{', ...' * (len(edited) > 4)}"
    return problem


def _strategy_misfit(parts: RunParts, state: dict[str, Any]) -> str | None:
    try:
        parts.strategy.load_state_dict(state)
        parts.strategy.on_resume(parts.ctx)  # re-create modules (adapters) before the weights are compared
    except Exception as exc:  # a state written by another strategy or with other options
        return f"strategy state: {type(exc).__name__} {exc}"
    return None


def config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (nested dicts)."""
    changed = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed
