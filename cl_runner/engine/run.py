"""run(cfg): load the task sequence, build the model and the strategy, then for each task train it and
evaluate every task of the sequence; write the matrix, the metrics and the history as they come, and
checkpoint so that an interrupted run continues exactly where it stopped.

The parts, in the order a run uses them: ``build_parts`` (model, tasks, strategy, context), ``start_state``
(a fresh ``RunState`` or one restored from the newest checkpoint), ``CheckpointPolicy`` (when and how to
checkpoint), ``SequenceRun`` (the task loop, its progress bar and stop requests) and ``finish`` (summary,
plots, console table)."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cl_runner.config.schema import CheckpointConfig, Config, TrainConfig, as_dict
from cl_runner.config.task_overrides import strategy_config, task_options
from cl_runner.core import dist
from cl_runner.core.errors import CheckpointMismatch, ConfigError
from cl_runner.core.files import write_atomic
from cl_runner.core.rng import rank_rng, rng_state, set_rng_state
from cl_runner.engine.checkpoint import (
    Checkpoint,
    best_weights,
    checkpoint_bytes,
    has_best,
    load_shards,
    load_strategy_shards,
    load_weights,
    move_aside,
    newest_on_every_rank,
    next_number,
    save_checkpoint,
    weights_mismatch,
)
from cl_runner.engine.loop import Boundary, EpochRecord, LoopCallbacks, TaskRun, make_optimizer, read_extras, train_task
from cl_runner.engine.parallel import shard
from cl_runner.engine.run_state import RunState
from cl_runner.engine.runtime import (
    RunInterrupted,
    StopRequest,
    autocast_factory,
    package_versions,
    resolve_device,
    run_lock,
    seed_everything,
    stop_signals,
)
from cl_runner.engine.threads import apply_threads
from cl_runner.models.kinds import kind_of
from cl_runner.models.lm import collate
from cl_runner.models.load import load_model, load_tokenizer, parameter_counts
from cl_runner.outputs import cost
from cl_runner.outputs.plots import plot_run
from cl_runner.outputs.predictions import PredictionWriter
from cl_runner.outputs.results import RunWriter, print_summary
from cl_runner.scoring import cl_metrics
from cl_runner.scoring.evaluate import Scorer
from cl_runner.scoring.monitors import Monitors, matrix_rows, print_monitors
from cl_runner.scoring.monitors import summarize as summarize_monitors
from cl_runner.scoring.sequence import SequenceScorer
from cl_runner.strategies import Context, Strategy, build_strategy
from cl_runner.tasks import encode_task, load_sequence
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask
from cl_runner.trackers.fanout import Trackers, open_trackers

log = logging.getLogger(__name__)
AUTO_CHECKPOINT_FACTOR = 50  # automatic checkpoints: interval >= 50 x the cost of one, i.e. < 2% overhead
AUTO_CHECKPOINT_MIN_S = 30.0


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(),
        TextColumn("{task.fields[extras]}"),
        console=console, transient=False,
    )


@dataclass
class RunParts:
    """What a run is built from, once per process (before any checkpoint is read)."""

    cfg: Config
    run_dir: Path
    tasks: list[Task]
    encoded: list[EncodedTask]
    tokenizer: Any
    model: torch.nn.Module  # the torch.compile wrapper once compiled
    strategy: Strategy
    ctx: Context
    device: torch.device
    precision: str
    scaler: torch.amp.GradScaler | None
    world: dist.World = dist.World()
    monitors: Monitors | None = None  # tasks.monitor: scored at every stage, never trained

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def build_parts(cfg: Config, run_dir: Path, base_dir: Path | None) -> RunParts:
    """Load the tasks (data errors surface before any model is loaded), tokenizer and model; build the strategy."""
    device, precision = resolve_device(cfg.device)
    world = dist.world()
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)  # one device per rank (torchrun's LOCAL_RANK)
    seed_everything(cfg.seed)
    tasks = load_sequence(cfg.tasks, cfg.seed, base_dir)
    monitors = Monitors(cfg, base_dir)  # their data errors too before the model loads
    tokenizer = load_tokenizer(cfg.model, [text for t in tasks for text in t.texts()])
    model = load_model(cfg.model, tokenizer, cfg.seed)
    if not world.sharded:  # sharded models move to the device once sharded (place_sharded)
        model = model.to(device)
    apply_threads(cfg.device.threads, model)  # before the first step; the count depends on the model's size
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and cfg.train.max_length > context:
        raise ConfigError(f"train.max_length: {cfg.train.max_length} exceeds the model's context of {context} "
                          "tokens; lower it (longer prompts are then cut in the middle, targets never)")
    if device.type == "cuda" and cfg.device.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    encoded = [encode_task(t, i, tokenizer, cfg.train.max_length) for i, t in enumerate(tasks)]
    monitors.encode(tokenizer, cfg.train.max_length)
    ctx = Context(
        model=model, device=device, autocast=autocast_factory(device, precision),
        collate=partial(collate, pad_id=tokenizer.pad_token_id, device=device),
        task_names=[t.name for t in tasks], train_sets=[e.train for e in encoded], batch_size=cfg.train.batch_size,
        seed=cfg.seed, eos_id=tokenizer.eos_token_id, decode=partial(tokenizer.decode, skip_special_tokens=True),
        kind=kind_of(model),  # chosen once, on the model as loaded (models/kinds.py)
    )
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    strategy = build_strategy(strategy_config(cfg.strategy, cfg.tasks.strategy_overrides))
    if world.sharded:
        place_sharded(model, strategy, ctx, cfg)
    parts = RunParts(cfg, run_dir, tasks, encoded, tokenizer, model, strategy, ctx, device, precision, scaler, world,
                     monitors)
    parts.strategy.check(ctx)  # options that name parameters or modules: before any evaluation or training
    return parts


def place_sharded(model: torch.nn.Module, strategy: Strategy, ctx: Context, cfg: Config) -> None:
    """FSDP: the strategy first adds what it would add during the run (every task's adapter or column, inactive
    until its task: ``before_shard``), since a sharded module tree is fixed; then ``fully_shard`` block by block
    in host memory, and only this rank's shards move to the device."""
    strategy.before_shard(ctx)
    shard(model, cfg.distributed)
    model.to(ctx.device)


def run_info(parts: RunParts) -> dict[str, Any]:
    """What the run is: the static part of metrics.json."""
    cfg, device = parts.cfg, parts.device
    return {
        "experiment_name": cfg.experiment_name, "strategy": cfg.strategy.name, "task_sequence": cfg.tasks.name,
        "tasks": parts.names, "metric_per_task": [t.metric for t in parts.tasks], "seed": cfg.seed,
        "device": str(device), "precision": parts.precision, "cpu_threads": torch.get_num_threads(),
        "distributed": {"kind": parts.world.kind, "world_size": parts.world.size},
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "parameters": {**parameter_counts(parts.model), "trainable_per_task": {}}, "versions": package_versions(),
        "prompts_cut": {t.name: t.cut for t in parts.encoded},
        **({"monitor_tasks": parts.monitors.info()} if parts.monitors.items else {}),
        "examples": {t.name: t.info["sizes"] for t in parts.tasks},
        "config": as_dict(cfg),
    }


def sequence_scorer(parts: RunParts) -> SequenceScorer:
    tokenizer = parts.tokenizer
    scorer = Scorer(model=parts.model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                    device=parts.device, autocast=parts.ctx.autocast, batch_size=parts.cfg.train.eval_batch_size,
                    cfg=parts.cfg.eval, decode=partial(tokenizer.decode, skip_special_tokens=True),
                    batch_tokens=parts.cfg.train.eval_batch_tokens, kind=parts.ctx.kind)
    caps = [None if t.max_eval_examples is not None else parts.cfg.eval.max_examples  # the task's own cap wins
            for t in parts.cfg.tasks.tasks]
    return SequenceScorer(scorer, parts.tasks, parts.encoded, parts.strategy, parts.ctx, parts.cfg.eval.full_every,
                          parts.cfg.train.max_validation_examples, parts.cfg.seed, caps)


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
    parts.ctx.extras.update(saved["extras"])
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
        problem = _strategy_misfit(parts, checkpoint.state["strategy"]) or weights_mismatch(checkpoint, parts.model)
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


class CheckpointPolicy:
    """When to checkpoint inside a task (every ``every_n_steps`` steps, or automatically: at most ~2% of the
    time; never with ``mid_task: false``), and writing one: weights, best weights, run state, loop state,
    strategy state, logged values, RNG (distributed: every rank together, each writing its shards)."""

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


def format_extras(extras: dict[str, float]) -> str:
    """Logged values for the progress bar, compactly: ``ewc_penalty 0.12 · buffer_examples 64``."""
    return " · ".join(f"{name} {value:.3g}" for name, value in extras.items())


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
        with stop_signals(self.stop), _progress(console) as progress:
            if not self.state.stages:
                self.add_stage("init", self.scoring.score())
            for i in range(self.state.next_task, len(self.parts.tasks)):
                self.train_task(i, task_resume, progress)
                task_resume = None

    def train_task(self, i: int, resume: dict[str, Any] | None, progress: Progress) -> None:
        """Train task ``i`` (continuing it from ``resume``), score the sequence, checkpoint."""
        parts, state, name = self.parts, self.state, self.parts.names[i]
        parts.ctx.task_index = i
        callbacks = _TaskCallbacks(self, progress, f"[{i + 1}/{len(parts.tasks)}] {name}")
        task_started = time.perf_counter()
        records = train_task(TaskRun(parts.ctx, parts.strategy, parts.encoded[i].train, for_task(parts, i),
                                     self.scoring.validate, parts.scaler, resume, callbacks, parts.cfg.distributed))
        state.history.extend(asdict(r) for r in records)
        state.wall_time_per_task_s[name] = round(
            state.wall_time_per_task_s.get(name, 0.0) + time.perf_counter() - task_started, 3)
        for file_name, text in parts.ctx.artifacts.items() if parts.world.main else ():  # e.g. pseudo-examples
            write_atomic(parts.run_dir / file_name, text)
        self.add_stage(f"after_{name}", self.scoring.score_after(i))
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

    def __init__(self, run: SequenceRun, progress: Progress, label: str) -> None:
        self.run, self.progress, self.label, self.epochs = run, progress, label, 0
        self.bar = progress.add_task(label, total=None, loss="-", speed="-", extras="")

    def on_step(self, event: dict[str, Any]) -> None:
        if event["event"] == "task_start":
            self.epochs, parts = event["epochs"], self.run.parts
            trainable = self.run.state.info["parameters"].setdefault("trainable_per_task", {})
            trainable[parts.names[parts.ctx.task_index]] = event["trainable"]
            self.progress.update(self.bar, total=event["total_steps"], completed=event["step"])
        else:
            mfu = "" if event["mfu"] is None else f"MFU {event['mfu']:.1%} · "
            self.progress.update(self.bar, completed=event["step"], loss=f"{event['loss']:.3f}",
                                 speed=f"{event['tokens_per_s']:,.0f}", extras=mfu + format_extras(event["extras"]),
                                 description=f"{self.label} · epoch {event['epoch']}/{self.epochs}")
        self.run.trackers.on_step(event, self.run.parts.ctx)

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


def run(cfg: Config, run_dir: Path, config_yaml: str = "", console: Console | None = None,
        base_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Execute the whole task sequence (or continue it from its newest checkpoint when ``resume``);
    returns the contents of metrics.json. ``config_yaml`` is saved first (unless the run has one), before
    anything is loaded, so that a run stopped at any moment can be resumed. Until the task loop starts,
    SIGINT/SIGTERM stop the run at once, with status ``interrupted``."""
    run_dir = Path(run_dir)
    stop = StopRequest(deferred=False, run_dir=run_dir)
    world = dist.join(cfg.distributed.kind, resolve_device(cfg.device)[0].type == "cuda", cfg.distributed.timeout_s)
    with run_lock(run_dir) if world.main else nullcontext(), stop_signals(stop):  # rank 0 holds the lock, writes
        if config_yaml and world.main and not (run_dir / "config.yaml").exists():
            write_atomic(run_dir / "config.yaml", config_yaml)
        try:
            return _run(cfg, run_dir, console or Console(quiet=not world.main), base_dir, resume)
        except BaseException as exc:
            if stop.signum is None or (isinstance(exc, RunInterrupted) and exc.checkpointed):
                raise
            if world.main:  # stopped outside the task loop (even if a library re-raised it as another)
                _mark_interrupted(run_dir)
            raise RunInterrupted(stop.signum, run_dir, checkpointed=False) from None


def _mark_interrupted(run_dir: Path) -> None:
    """metrics.json says ``interrupted`` (keeping what it already holds) after a stop outside the task loop."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        metrics = {}
    write_atomic(path, json.dumps({**metrics, "status": "interrupted"}, indent=2) + "\n")


def _run(cfg: Config, run_dir: Path, console: Console, base_dir: Path | None, resume: bool) -> dict[str, Any]:
    started = time.perf_counter()
    parts = build_parts(cfg, run_dir, base_dir)
    cost.start(parts.device)  # CUDA's peak memory counts from here (the cost block of metrics.json)
    writer = (RunWriter(run_dir, parts.names, parts.monitors.names) if parts.world.main
              else RankWriter(run_dir, parts.names))
    policy = CheckpointPolicy(cfg.checkpoint, parts)
    state, task_resume = start_state(parts, writer, console, resume, started)
    if parts.device.type == "cuda" and cfg.device.compile:
        parts.ctx.model = parts.model = torch.compile(parts.model)
    for name, cut in state.info["prompts_cut"].items():
        if any(cut.values()):
            log.warning("task %s: %s examples longer than train.max_length had their prompt cut", name, cut)
    console.print(f"[bold]cl-run[/bold] {cfg.strategy.name} on {cfg.tasks.name} ({len(parts.tasks)} tasks: "
                  f"{', '.join(parts.names)}) · {parts.device} {parts.precision} · "
                  f"{state.info['parameters']['total']:,} parameters")
    trackers = open_trackers(parts, state, task_resume)  # logger=...: rank 0; a no-op without one
    try:
        SequenceRun(parts, state, writer, policy, trackers).train(console, task_resume)
        metrics = finish(parts, state, writer, console)  # a full disk while writing the results is a failure too
        trackers.close(state)
        return metrics
    except (RunInterrupted, KeyboardInterrupt):
        state.status = "interrupted"
        writer.write_metrics(state.to_metrics())
        trackers.close(state)
        raise
    except BaseException as exc:
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        writer.write_metrics(state.to_metrics())
        trackers.close(state)
        raise


def finish(parts: RunParts, state: RunState, writer: RunWriter, console: Console) -> dict[str, Any]:
    """Summary metrics, final metrics.json, plots, the tokenizer of a model built from config, console table."""
    rows, metric_names = state.rows(), [t.metric for t in parts.tasks]
    state.results = cl_metrics.summarize(rows[1:], rows[0], [t.higher_is_better for t in parts.tasks], parts.names)
    state.results["strategy_accounting"] = parts.strategy.accounting()
    if parts.monitors.items:  # apart from ACC/forgetting/BWT/FWT, which are over the sequence only
        state.results["monitors"] = summarize_monitors(state.stages, parts.monitors.names)
    state.info["parameters"]["final"] = parameter_counts(parts.model)  # adapters and columns add parameters
    state.results["wall_time_s"] = round(state.elapsed(), 3)
    state.status = "completed"
    metrics = state.to_metrics()
    writer.write_metrics(metrics)
    if not parts.world.main:
        return metrics
    plot_run(parts.run_dir, parts.names, rows, metric_names,
             title=f"{parts.cfg.strategy.name} · seed {parts.cfg.seed}")
    if parts.cfg.model.name_or_path is None:
        parts.tokenizer.save_pretrained(parts.run_dir / "tokenizer")
    print_summary(console, parts.names, rows, metrics, metric_names, parts.run_dir)
    print_monitors(console, metrics.get("monitors") or {})
    return metrics


class RankWriter(RunWriter):
    """The writer of ranks other than 0: it keeps the rows like rank 0's and writes nothing (rank 0 writes)."""

    def __init__(self, run_dir: Path, task_names: list[str]) -> None:
        self.run_dir, self.task_names, self.rows = Path(run_dir), task_names, []

    def set_rows(self, rows: list[list[float]]) -> None:
        self.rows = list(rows)

    def add_history(self, record: dict[str, Any]) -> None:
        pass

    def set_history(self, records: list[dict[str, Any]]) -> None:
        pass

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def supersede(self) -> Path | None:
        return None


def run_is_finished(run_dir: Path) -> bool:
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
