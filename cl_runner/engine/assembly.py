"""Assembling a run, once per process and before any checkpoint is read: the task sequence (its data errors
first), tokenizer, model, strategy and the ``Context`` hooks see (``build_parts``); what the run is, for
metrics.json (``run_info``); and the scorer of the whole sequence (``sequence_scorer``)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cl_runner.config.schema import Config, as_dict
from cl_runner.config.task_overrides import strategy_config
from cl_runner.core import dist
from cl_runner.core.errors import ConfigError
from cl_runner.engine.activations import enable as checkpoint_activations
from cl_runner.engine.parallel import shard
from cl_runner.engine.runtime import autocast_factory, package_versions, resolve_device, seed_everything
from cl_runner.engine.threads import apply_threads
from cl_runner.models.kinds import kind_of
from cl_runner.models.lm import collate
from cl_runner.models.load import load_model, load_tokenizer, parameter_counts
from cl_runner.scoring.evaluate import Scorer
from cl_runner.scoring.monitors import Monitors
from cl_runner.scoring.sequence import SequenceScorer
from cl_runner.strategies import Context, Strategy, build_strategy
from cl_runner.tasks import encode_task, load_sequence
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask


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
    """Load the tasks and the tokenizer and encode the tasks (data and template errors surface before any model is
    loaded), then the model; build the strategy."""
    # HF tokenizers' own threads off (unless the user set them): tokenization here is a one-off, and a process that
    # forks after they ran (torch.compile's workers, a tracker's process) warns and may deadlock
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device, precision = resolve_device(cfg.device)
    world = dist.world()
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)  # one device per rank (torchrun's LOCAL_RANK)
    seed_everything(cfg.seed)
    tasks = load_sequence(cfg.tasks, cfg.seed, base_dir, cfg.train.max_examples)  # train.max_examples: per task
    monitors = Monitors(cfg, base_dir)  # their data errors too before the model loads
    tokenizer = load_tokenizer(cfg.model, [text for t in tasks for text in t.texts()])
    # encoding needs only the tokenizer: its errors (a chat template the tokenizer lacks) come before the model loads
    encoded = [encode_task(t, i, tokenizer, cfg.train.max_length) for i, t in enumerate(tasks)]
    monitors.encode(tokenizer, cfg.train.max_length)
    model = load_model(cfg.model, tokenizer, cfg.seed)
    if cfg.train.activation_checkpointing:  # before sharding: fully_shard wraps the checkpointed blocks
        checkpoint_activations(model)
    if not world.sharded:  # sharded models move to the device once sharded (place_sharded)
        model = model.to(device)
    apply_threads(cfg.device.threads, model)  # before the first step; the count depends on the model's size
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and cfg.train.max_length > context:
        raise ConfigError(f"train.max_length: {cfg.train.max_length} exceeds the model's context of {context} "
                          "tokens; lower it (longer prompts are then cut in the middle, targets never)")
    if device.type == "cuda" and cfg.device.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
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
    """The scorer of every task of the sequence (and the validation sets), with the run's evaluation settings."""
    tokenizer = parts.tokenizer
    scorer = Scorer(model=parts.model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                    device=parts.device, autocast=parts.ctx.autocast, batch_size=parts.cfg.train.eval_batch_size,
                    cfg=parts.cfg.eval, decode=partial(tokenizer.decode, skip_special_tokens=True),
                    batch_tokens=parts.cfg.train.eval_batch_tokens, kind=parts.ctx.kind)
    caps = [None if t.max_eval_examples is not None else parts.cfg.eval.max_examples  # the task's own cap wins
            for t in parts.cfg.tasks.tasks]
    return SequenceScorer(scorer, parts.tasks, parts.encoded, parts.strategy, parts.ctx, parts.cfg.eval.full_every,
                          parts.cfg.train.max_validation_examples, parts.cfg.seed, caps)
