"""run(): one run of a task sequence in its directory, from claiming the directory to the final metrics.json; the
one entry point of the engine, for cl-run and for tests alike.

The parts, in the order a run uses them: claiming the directory (claim.py: rank 0 locks it and compares the
config it holds, the other ranks wait for its word), ``build_parts`` (assembly.py: model, tasks, strategy,
context), ``start_state`` (resume.py: a fresh state or the newest checkpoint's), ``CheckpointPolicy``
(checkpoint_policy.py), ``SequenceRun`` (sequence.py: the task loop, its progress bar and stop requests) and
``finish`` (summary, plots, console table)."""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cl_runner.config.schema import Config
from cl_runner.core import dist
from cl_runner.core.files import write_atomic
from cl_runner.engine import memory_plan
from cl_runner.engine.assembly import RunParts, build_parts
from cl_runner.engine.checkpoint_policy import CheckpointPolicy
from cl_runner.engine.claim import Refused, RunHooks, agreed, claim, read_metrics
from cl_runner.engine.resume import start_state
from cl_runner.engine.run_state import RunState
from cl_runner.engine.runtime import RunInterrupted, StopRequest, join, resolve_device, run_lock, stop_signals
from cl_runner.engine.sequence import SequenceRun
from cl_runner.engine.takeaway import save_stage
from cl_runner.models.load import parameter_counts
from cl_runner.outputs import cost
from cl_runner.outputs.plots import plot_run
from cl_runner.outputs.results import RankWriter, RunWriter, print_summary
from cl_runner.scoring import cl_metrics
from cl_runner.scoring.monitors import print_monitors
from cl_runner.scoring.monitors import summarize as summarize_monitors
from cl_runner.strategies.memory import MEMORY_OPTIONS
from cl_runner.trackers.fanout import open_trackers

log = logging.getLogger(__name__)


def run(cfg: Config, run_dir: Path, config_yaml: str = "", console: Console | None = None,
        base_dir: Path | None = None, resume: bool | None = False, hooks: RunHooks | None = None) -> dict[str, Any]:
    """Execute the whole task sequence in ``run_dir`` (or continue it from its newest checkpoint when ``resume``);
    returns the contents of metrics.json (``{}`` on a rank other than 0 that had nothing to do).

    Runs in this process's process group (cl-run joins it before it plans the run directory; otherwise it is
    joined here). Rank 0 locks ``run_dir`` for the whole run: a second run on it is refused (UserError) having
    written nothing. ``resume=None`` (cl-run's): continue when ``run_dir`` already holds this experiment (its
    config.yaml is ``config_yaml``; another experiment's is refused the same way), and leave a run that already
    finished as it is (returning its metrics). ``config_yaml`` is saved first (unless the run has one), before
    anything is loaded, so that a run stopped at any moment can be resumed. Until the task loop starts,
    SIGINT/SIGTERM stop the run at once, with status ``interrupted``."""
    run_dir, hooks = Path(run_dir), hooks or RunHooks()
    device, precision = resolve_device(cfg.device)  # a device that is not there: refused before the directory
    world = dist.world() if dist.world().kind == cfg.distributed.kind else join(cfg)  # is touched
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    memory = memory_plan.check(cfg, device, precision)  # a run that cannot fit: refused before anything loads
    try:
        with run_lock(run_dir) if world.main else nullcontext():  # rank 0 holds the lock and writes the files
            resume = claim(run_dir, config_yaml, resume, hooks)
            if resume is None:
                return read_metrics(run_dir) if world.main else {}
            console = console or Console(quiet=not world.main)
            if memory is not None:
                console.print(memory.text(), highlight=False)
            try:
                metrics = _start(cfg, run_dir, config_yaml, console, base_dir, resume)
            except BaseException as exc:
                hooks.ended(run_dir, exc)
                raise
            hooks.ended(run_dir, None)
            return metrics
    except Refused:  # every rank waits until rank 0 has undone the refused start and let go of the lock
        dist.barrier()
        raise


def _start(cfg: Config, run_dir: Path, config_yaml: str, console: Console, base_dir: Path | None,
           resume: bool) -> dict[str, Any]:
    """The claimed run: config.yaml first, then the run; a stop signal before the task loop stops it at once."""
    main = dist.world().main
    stop = StopRequest(deferred=False, run_dir=run_dir)
    with stop_signals(stop):
        if config_yaml and main and not (run_dir / "config.yaml").exists():
            write_atomic(run_dir / "config.yaml", config_yaml)
        try:
            return _run(cfg, run_dir, console, base_dir, resume)
        except BaseException as exc:
            if stop.signum is None or (isinstance(exc, RunInterrupted) and exc.checkpointed):
                raise
            if main:  # stopped outside the task loop (even if a library re-raised it as another)
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
    parts = agreed(lambda: build_parts(cfg, run_dir, base_dir))  # every rank accepted the inputs, or none goes on
    cost.start(parts.device)  # CUDA's peak memory counts from here (the cost block of metrics.json)
    writer = (RunWriter(run_dir, parts.names, parts.monitors.names) if parts.world.main
              else RankWriter(run_dir, parts.names))
    policy = CheckpointPolicy(cfg.checkpoint, parts)
    state, task_resume = start_state(parts, writer, console, resume, started)
    if parts.device.type == "cuda" and cfg.device.compile:
        parts.ctx.model = parts.model = torch.compile(parts.model)  # Context.model: hooks see the compiled one
    for name, cut in state.info["prompts_cut"].items():
        if any(cut.values()):
            log.warning("task %s: %s examples longer than train.max_length had their prompt cut", name, cut)
    console.print(f"[bold]cl-run[/bold] {cfg.strategy.name} on {cfg.tasks.name} ({len(parts.tasks)} tasks: "
                  f"{', '.join(parts.names)}) · {parts.device} {parts.precision} · "
                  f"{state.info['parameters']['total']:,} parameters", soft_wrap=True)  # a log file: one line
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
        if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):  # older torch: a RuntimeError, left as it is
            state.error = out_of_memory_line(cfg, exc)
        writer.write_metrics(state.to_metrics())
        trackers.close(state)
        raise


def out_of_memory_line(cfg: Config, exc: BaseException) -> str:
    """One line for a CUDA out-of-memory: what ran, and the options that lower the memory (the training
    batch's, evaluation's, and the strategy's own: ``strategies.memory.MEMORY_OPTIONS``)."""
    t = cfg.train
    own = [f"strategy.{k}" for k in MEMORY_OPTIONS if getattr(cfg.strategy, k, None) is not None]
    lower = ", ".join(["train.eval_batch_size", "train.max_length", *own])
    return (f"CUDA out of memory running {cfg.strategy.name} on {cfg.model.name_or_path or 'the model'} with "
            f"batch_size={t.batch_size} (grad_accum={t.grad_accum}): raise train.grad_accum (same batch, less "
            f"memory) or lower {lower} ({str(exc).splitlines()[0]})")  # whole: a cut reason reads as another


def finish(parts: RunParts, state: RunState, writer: RunWriter, console: Console) -> dict[str, Any]:
    """Summary metrics, the saved model (``save.final_model``), final metrics.json, plots, the tokenizer of a model
    built from config, console table."""
    rows, metric_names = state.rows(), [t.metric for t in parts.tasks]
    state.results = cl_metrics.summarize(rows[1:], rows[0], [t.higher_is_better for t in parts.tasks], parts.names)
    state.results["strategy_accounting"] = parts.strategy.accounting()
    if parts.monitors.items:  # apart from ACC/forgetting/BWT/FWT, which are over the sequence only
        state.results["monitors"] = summarize_monitors(state.stages, parts.monitors.names)
    state.info["parameters"]["final"] = parameter_counts(parts.model)  # adapters and columns add parameters
    if parts.cfg.save.final_model:  # every rank: FSDP gathers the shards; rank 0 writes model/
        state.results["saved_model"] = save_stage(parts, state.stages[-1]["stage"], final=True)
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
