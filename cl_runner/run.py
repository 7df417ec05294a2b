"""run(cfg): load the task sequence, build the model and the strategy, then for each task train it and
evaluate every task of the sequence; write the matrix, the metrics and the history as they come, and
checkpoint so that an interrupted run continues exactly where it stopped."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cl_runner import metrics as cl_metrics
from cl_runner.checkpoint import latest_intact, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cl_runner.errors import ConfigError, UserError
from cl_runner.evaluate import Scorer, score_task
from cl_runner.lm import collate
from cl_runner.loop import Boundary, EpochRecord, train_task
from cl_runner.models import load_model, load_tokenizer, parameter_counts
from cl_runner.plots import plot_run
from cl_runner.results import RunWriter, print_summary, write_atomic
from cl_runner.schema import Config, DeviceConfig, as_dict
from cl_runner.strategies import Context, build_strategy
from cl_runner.tasks import encode_task, load_sequence

log = logging.getLogger(__name__)
AUTO_CHECKPOINT_FACTOR = 50  # automatic checkpoints: interval >= 50 x the cost of one, i.e. < 2% overhead
AUTO_CHECKPOINT_MIN_S = 30.0


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum: int, run_dir: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.run_dir = signum, run_dir


def resolve_device(cfg: DeviceConfig) -> tuple[torch.device, str]:
    """The torch device and the precision (fp32 | bf16 | fp16) the run will use."""
    kind = cfg.type
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device.type: cuda was requested but no CUDA device is visible (use device=cpu or auto)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device.type: mps was requested but MPS is not available")
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if kind == "cuda" else "fp32"
    if precision == "fp16" and kind != "cuda":
        raise ConfigError(f"device.precision: fp16 needs CUDA (device is {kind}); use fp32 or bf16")
    return torch.device(kind), precision


def autocast_factory(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str]:
    import datasets
    import hydra
    import transformers

    from cl_runner import __version__

    return {"cl_runner": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": transformers.__version__, "datasets": datasets.__version__, "hydra": hydra.__version__}


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(),
        console=console, transient=False,
    )


@contextmanager
def run_lock(run_dir: Path):
    """Hold ``<run_dir>/.lock`` for the whole run: a second cl-run on the same directory fails at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"run directory {run_dir} is in use by another cl-run (lock file {run_dir / '.lock'})") \
            from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextmanager
def stop_signals(stop: dict):
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second SIGINT stops at once."""
    def request(signum, frame):
        if stop.get("signum") == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signum"] = signum

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, request)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(cfg: Config, run_dir: Path, config_yaml: str = "", console: Console | None = None,
        base_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Execute the whole task sequence (or continue it from its newest checkpoint when ``resume``);
    returns the contents of metrics.json."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        return _run(cfg, run_dir, config_yaml, console or Console(), base_dir, resume)


def _run(cfg: Config, run_dir: Path, config_yaml: str, console: Console, base_dir: Path | None,
         resume: bool) -> dict[str, Any]:
    started = time.perf_counter()
    device, precision = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    tasks = load_sequence(cfg.tasks, cfg.seed, base_dir)  # data errors surface before any model is loaded
    names = [t.name for t in tasks]
    tokenizer = load_tokenizer(cfg.model, [text for t in tasks for text in t.texts()])
    model = load_model(cfg.model, tokenizer, cfg.seed).to(device)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and cfg.train.max_length > context:
        raise ConfigError(f"train.max_length: {cfg.train.max_length} exceeds the model's context of {context} "
                          "tokens; lower it (longer prompts are then cut in the middle, targets never)")
    if device.type == "cuda" and cfg.device.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    encoded = [encode_task(t, i, tokenizer, cfg.train.max_length) for i, t in enumerate(tasks)]
    strategy = build_strategy(cfg.strategy)
    autocast = autocast_factory(device, precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    ctx = Context(
        model=model, device=device, autocast=autocast,
        collate=partial(collate, pad_id=tokenizer.pad_token_id, device=device),
        task_names=names, train_sets=[e.train for e in encoded], batch_size=cfg.train.batch_size, seed=cfg.seed,
        eos_id=tokenizer.eos_token_id, decode=partial(tokenizer.decode, skip_special_tokens=True),
    )
    writer = RunWriter(run_dir, names)
    if config_yaml:
        writer.write_config(config_yaml)
    info: dict[str, Any] = {
        "status": "running", "experiment_name": cfg.experiment_name, "strategy": cfg.strategy.name,
        "task_sequence": cfg.tasks.name, "tasks": names, "metric_per_task": [t.metric for t in tasks],
        "seed": cfg.seed, "device": str(device), "precision": precision,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "parameters": parameter_counts(model), "versions": package_versions(),
        "prompts_cut": {t.name: t.cut for t in encoded},
        "examples": {t.name: t.info["sizes"] for t in tasks},
        "config": as_dict(cfg), "stages": [], "wall_time_per_task_s": {}, "checkpoints": {"count": 0},
    }
    history: list[dict] = []  # epoch records of finished tasks
    next_task, task_resume, saves = 0, None, {"seq": 0, "last_time": time.perf_counter(), "last_cost": None}

    elapsed_before = 0.0  # wall time of the run's earlier lives (before a resume)
    checkpoint_path = latest_intact(run_dir) if resume and cfg.checkpoint.enabled else None
    if checkpoint_path is not None:
        strategy_state = torch.load(checkpoint_path / "state.pt", map_location="cpu", weights_only=True)["strategy"]
        strategy.load_state_dict(strategy_state)
        strategy.on_resume(ctx)  # re-create modules (adapters) before the weights are loaded into them
        state, best = load_checkpoint(checkpoint_path, model)
        info.update(state["info"] | {"status": "running"})
        history, next_task, saves["seq"] = state["history"], state["next_task"], state["seq"]
        elapsed_before = float(info.get("elapsed_s", 0.0))
        if state["task"] is not None:
            task_resume = state["task"] | {"best": best}
        writer.set_rows([[stage["scores"][n]["score"] for n in names] for stage in info["stages"]])
        pending = history + (task_resume["loop"]["records"] if task_resume else [])
        write_atomic(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in pending))
        set_rng_state(state["rng"])
        console.print(f"resuming from {checkpoint_path} (task {next_task + 1}/{len(tasks)})")
    elif resume:
        log.warning("no usable checkpoint in %s: starting the run from the beginning", run_dir)
    if device.type == "cuda" and cfg.device.compile:
        ctx.model = model = torch.compile(model)
    scorer = Scorer(model=model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, device=device,
                    autocast=autocast, batch_size=cfg.train.eval_batch_size, cfg=cfg.eval,
                    decode=partial(tokenizer.decode, skip_special_tokens=True))
    for name, cut in info["prompts_cut"].items():
        if any(cut.values()):
            log.warning("task %s: %s examples longer than train.max_length had their prompt cut", name, cut)

    def checkpoint(task_state: dict | None, best: dict | None) -> None:
        saves["seq"] += 1
        info["elapsed_s"] = elapsed_before + time.perf_counter() - started
        state = {"info": info, "history": history, "next_task": next_task, "task": task_state,
                 "strategy": strategy.state_dict(), "rng": rng_state(), "seq": saves["seq"]}
        path, cost = save_checkpoint(run_dir, f"ckpt-{saves['seq']:06d}", model, state, best,
                                     cfg.checkpoint.keep_last)
        saves["last_time"], saves["last_cost"] = time.perf_counter(), cost
        info["checkpoints"] = {"count": info["checkpoints"]["count"] + 1, "last_seconds": round(cost, 4),
                               "bytes": sum(f.stat().st_size for f in path.iterdir())}

    def checkpoint_due(step: int) -> bool:
        if not cfg.checkpoint.enabled:
            return False
        if cfg.checkpoint.every_n_steps is not None:
            return step % cfg.checkpoint.every_n_steps == 0
        cost = saves["last_cost"] if saves["last_cost"] is not None else 0.0
        interval = max(AUTO_CHECKPOINT_FACTOR * cost, AUTO_CHECKPOINT_MIN_S)
        return time.perf_counter() - saves["last_time"] >= interval

    stop: dict = {}

    def on_boundary(b: Boundary) -> None:
        if stop or (b.kind == "step" and checkpoint_due(b.loop.step)):
            checkpoint(b.state_dict(), b.best_state)
        if stop:
            raise RunInterrupted(stop["signum"], run_dir)

    def evaluate_all(split: str = "test", indices: list[int] | None = None) -> list[dict]:
        results = []
        for j in indices if indices is not None else range(len(tasks)):
            strategy.before_eval(ctx, j)
            results.append(score_task(scorer, encoded[j], tasks[j].metric, tasks[j].stop, tasks[j].labels, split))
        return results

    def validate(indices: list[int]) -> float:
        scores = evaluate_all("validation", indices)
        signed = [s["score"] if tasks[j].higher_is_better else -s["score"]
                  for j, s in zip(indices, scores, strict=True)]
        return sum(signed) / len(signed)

    def add_stage(stage: str, results: list[dict]) -> None:
        writer.add_row([r["score"] for r in results])
        info["stages"].append({"stage": stage, "scores": {n: r for n, r in zip(names, results, strict=True)}})
        writer.write_metrics(info)

    console.print(f"[bold]cl-run[/bold] {cfg.strategy.name} on {cfg.tasks.name} ({len(tasks)} tasks: "
                  f"{', '.join(names)}) · {device} {precision} · {info['parameters']['total']:,} parameters")
    try:
        with stop_signals(stop), _progress(console) as progress:
            if not info["stages"]:
                add_stage("init", evaluate_all())
            for i in range(next_task, len(tasks)):
                ctx.task_index = i
                bar = progress.add_task(f"[{i + 1}/{len(tasks)}] {names[i]}", total=None, loss="-", speed="-")
                task_started = time.perf_counter()

                task_epochs = {}

                def on_step(event: dict, bar=bar, i=i, epochs=task_epochs) -> None:
                    if event["event"] == "task_start":
                        epochs[0] = event["epochs"]
                        progress.update(bar, total=event["total_steps"], completed=event["step"])
                    else:
                        progress.update(bar, completed=event["step"], loss=f"{event['loss']:.3f}",
                                        speed=f"{event['tokens_per_s']:,.0f}",
                                        description=f"[{i + 1}/{len(tasks)}] {names[i]} · epoch "
                                                    f"{event['epoch']}/{epochs[0]}")

                def on_epoch(record: EpochRecord) -> None:
                    writer.add_history(asdict(record))

                records = train_task(ctx, strategy, encoded[i].train, cfg.train, validate, on_step, on_epoch, scaler,
                                     on_boundary, task_resume)
                task_resume = None
                history.extend(asdict(r) for r in records)
                info["wall_time_per_task_s"][names[i]] = round(
                    info["wall_time_per_task_s"].get(names[i], 0.0) + time.perf_counter() - task_started, 3)
                for file_name, text in ctx.artifacts.items():  # e.g. generated pseudo-examples, for users to read
                    write_atomic(run_dir / file_name, text)
                add_stage(f"after_{names[i]}", evaluate_all())
                next_task = i + 1
                if cfg.checkpoint.enabled:
                    checkpoint(None, None)
                if stop:
                    raise RunInterrupted(stop["signum"], run_dir)
    except RunInterrupted:
        info["status"] = "interrupted"
        writer.write_metrics(info)
        raise
    except BaseException as exc:
        info["status"], info["error"] = "failed", f"{type(exc).__name__}: {exc}"
        writer.write_metrics(info)
        raise
    rows = [[stage["scores"][n]["score"] for n in names] for stage in info["stages"]]
    summary = cl_metrics.summarize(rows[1:], rows[0], [t.higher_is_better for t in tasks], names)
    info.update(summary)
    info["strategy_accounting"] = strategy.accounting()
    info["parameters"]["final"] = parameter_counts(model)  # adapters and columns add parameters on the way
    info["wall_time_s"] = round(elapsed_before + time.perf_counter() - started, 3)
    info["status"] = "completed"
    writer.write_metrics(info)
    plot_run(run_dir, names, rows, [t.metric for t in tasks], title=f"{cfg.strategy.name} · seed {cfg.seed}")
    if cfg.model.name_or_path is None:
        tokenizer.save_pretrained(run_dir / "tokenizer")
    print_summary(console, names, rows, info, [t.metric for t in tasks], run_dir)
    return info


def run_is_finished(run_dir: Path) -> bool:
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
