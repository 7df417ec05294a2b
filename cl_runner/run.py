"""run(cfg): load the task sequence, build the model and the strategy, then for each task train it and
evaluate every task of the sequence; write the matrix, the metrics and the history as they come."""

from __future__ import annotations

import logging
import platform
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cl_runner import metrics as cl_metrics
from cl_runner.errors import ConfigError
from cl_runner.evaluate import Scorer, score_task
from cl_runner.lm import collate
from cl_runner.loop import EpochRecord, train_task
from cl_runner.models import load_model, load_tokenizer, parameter_counts
from cl_runner.results import RunWriter, print_summary, write_atomic
from cl_runner.schema import Config, DeviceConfig, as_dict
from cl_runner.strategies import Context, build_strategy
from cl_runner.tasks import encode_task, load_sequence

log = logging.getLogger(__name__)


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

    return {"cl_runner": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__, "hydra": hydra.__version__}


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(),
        console=console, transient=False,
    )


def run(cfg: Config, run_dir: Path, config_yaml: str = "", console: Console | None = None,
        base_dir: Path | None = None) -> dict[str, Any]:
    """Execute the whole task sequence; returns the contents of metrics.json."""
    console = console or Console()
    started = time.perf_counter()
    device, precision = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    tasks = load_sequence(cfg.tasks, cfg.seed, base_dir)  # data errors surface before any model is loaded
    names = [t.name for t in tasks]
    tokenizer = load_tokenizer(cfg.model, [text for t in tasks for text in t.texts()])
    model = load_model(cfg.model, tokenizer, cfg.seed).to(device)
    if device.type == "cuda" and cfg.device.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.device.compile:
        model = torch.compile(model)
    encoded = [encode_task(t, i, tokenizer, cfg.train.max_length) for i, t in enumerate(tasks)]
    strategy = build_strategy(cfg.strategy)
    autocast = autocast_factory(device, precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    ctx = Context(
        model=model, device=device, autocast=autocast,
        collate=partial(collate, pad_id=tokenizer.pad_token_id, device=device),
        task_names=names, train_sets=[e.train for e in encoded], batch_size=cfg.train.batch_size, seed=cfg.seed,
    )
    scorer = Scorer(model=model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, device=device,
                    autocast=autocast, batch_size=cfg.train.eval_batch_size, cfg=cfg.eval,
                    decode=partial(tokenizer.decode, skip_special_tokens=True))
    writer = RunWriter(run_dir, names)
    writer.write_config(config_yaml)
    info: dict[str, Any] = {
        "status": "running", "experiment_name": cfg.experiment_name, "strategy": cfg.strategy.name,
        "task_sequence": cfg.tasks.name, "tasks": names, "metric_per_task": [t.metric for t in tasks],
        "seed": cfg.seed, "device": str(device), "precision": precision,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "parameters": parameter_counts(model), "versions": package_versions(),
        "prompts_cut": {t.name: t.cut for t in encoded},
        "examples": {t.name: t.info["sizes"] for t in tasks},
        "config": as_dict(cfg), "stages": [], "wall_time_per_task_s": {},
    }
    for name, cut in info["prompts_cut"].items():
        if any(cut.values()):
            log.warning("task %s: %s examples longer than train.max_length had their prompt cut", name, cut)

    def evaluate_all(split: str = "test", indices: list[int] | None = None) -> list[dict]:
        results = []
        for j in indices if indices is not None else range(len(tasks)):
            strategy.before_eval(ctx, j)
            results.append(score_task(scorer, encoded[j], tasks[j].metric, tasks[j].stop, tasks[j].labels, split))
        return results

    def validate(indices: list[int]) -> float:
        scores = evaluate_all("validation", indices)
        signed = [s["score"] if tasks[j].higher_is_better else -s["score"] for j, s in zip(indices, scores, strict=True)]
        return sum(signed) / len(signed)

    def add_stage(stage: str, results: list[dict]) -> None:
        writer.add_row([r["score"] for r in results])
        info["stages"].append({"stage": stage, "scores": {n: r for n, r in zip(names, results, strict=True)}})
        writer.write_metrics(info)

    console.print(f"[bold]cl-run[/bold] {cfg.strategy.name} on {cfg.tasks.name} ({len(tasks)} tasks: "
                  f"{', '.join(names)}) · {device} {precision} · {info['parameters']['total']:,} parameters")
    add_stage("init", evaluate_all())
    with _progress(console) as progress:
        for i in range(len(tasks)):
            ctx.task_index = i
            bar = progress.add_task(f"[{i + 1}/{len(tasks)}] {names[i]}", total=None, loss="-", speed="-")
            task_started = time.perf_counter()

            def on_step(event: dict, bar=bar, i=i) -> None:
                if event["event"] == "task_start":
                    progress.update(bar, total=event["total_steps"])
                    progress.update(bar, description=f"[{i + 1}/{len(tasks)}] {names[i]} · {event['epochs']} epochs")
                else:
                    progress.update(bar, completed=event["step"], loss=f"{event['loss']:.3f}",
                                    speed=f"{event['tokens_per_s']:,.0f}")

            def on_epoch(record: EpochRecord) -> None:
                writer.add_history(asdict(record))

            train_task(ctx, strategy, encoded[i].train, cfg.train, validate, on_step, on_epoch, scaler)
            info["wall_time_per_task_s"][names[i]] = round(time.perf_counter() - task_started, 3)
            for file_name, text in ctx.artifacts.items():  # e.g. generated pseudo-examples, for users to read
                write_atomic(run_dir / file_name, text)
            add_stage(f"after_{names[i]}", evaluate_all())
    rows = [[stage["scores"][n]["score"] for n in names] for stage in info["stages"]]
    summary = cl_metrics.summarize(rows[1:], rows[0], [t.higher_is_better for t in tasks], names)
    info.update(summary)
    info["strategy_accounting"] = strategy.accounting()
    info["wall_time_s"] = round(time.perf_counter() - started, 3)
    info["status"] = "completed"
    writer.write_metrics(info)
    if (tok_dir := run_dir / "tokenizer") and cfg.model.name_or_path is None:
        tokenizer.save_pretrained(tok_dir)
    print_summary(console, names, rows, info, [t.metric for t in tasks], run_dir)
    return info
