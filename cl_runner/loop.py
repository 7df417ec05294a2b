"""Train one task: AdamW, linear warmup + decay, gradient accumulation, clipping, autocast, strategy hooks.

The loss of a micro-batch is its mean over target tokens; before backward it is weighted by the micro-batch's
share of the optimizer step's target tokens, so ``grad_accum`` micro-batches give exactly the gradient of one
large batch. After each epoch the validation score is computed; with ``keep_best`` the best epoch's weights are
restored at the end of the task.

Everything needed to continue a task lives in ``LoopState`` plus the optimizer, scheduler, scaler and best
weights, handed to ``LoopCallbacks.on_boundary`` after every optimizer step and every epoch: the caller
checkpoints there, and ``TaskRun.resume`` continues bit-for-bit (the epoch's data order is recomputed from the
seed and the micro-batches already consumed are skipped before the strategy sees them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cl_runner.lm import Encoded, causal_lm_loss, target_mask
from cl_runner.schema import TrainConfig
from cl_runner.strategies.base import Context, Strategy


@dataclass
class EpochRecord:
    task: str
    task_index: int
    epoch: int
    step: int
    train_loss: float
    validation_score: float | None
    tokens_per_s: float
    seconds: float
    lr: float
    skipped_steps: int  # fp16 steps the GradScaler skipped (inf/nan gradients)
    extras: dict[str, float] = field(default_factory=dict)  # the latest values strategies logged (ctx.log)


@dataclass
class LoopState:
    """Position inside one task and the running sums of the current epoch."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken in this task
    batches_done: int = 0  # micro-batches of the current epoch already trained on
    best_score: float = -math.inf
    loss_sum: float = 0.0
    loss_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0
    records: list[dict] = field(default_factory=list)


@dataclass
class Boundary:
    """What ``on_boundary`` receives: enough to checkpoint the task exactly here."""

    loop: LoopState
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    best_state: dict[str, torch.Tensor] | None
    kind: str  # "step" | "epoch"

    def state_dict(self) -> dict[str, Any]:
        return {"loop": asdict(self.loop), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}


class LoopCallbacks:
    """What the caller hears from ``train_task``; every method is a no-op here: override the ones you need."""

    def on_step(self, event: dict[str, Any]) -> None:
        """Once ``{"event": "task_start", "total_steps", "epochs", "step"}``, then after every optimizer step
        ``{"event": "step", "step", "epoch", "loss", "tokens_per_s", "extras"}``."""

    def on_epoch(self, record: EpochRecord) -> None:
        """An epoch is finished and validated; ``record`` is its line of history.jsonl."""

    def on_boundary(self, boundary: Boundary) -> None:
        """After every optimizer step and every epoch: where the caller checkpoints (or stops)."""


@dataclass
class TaskRun:
    """Everything ``train_task`` needs to train one task."""

    ctx: Context
    strategy: Strategy
    examples: list[Encoded]
    cfg: TrainConfig
    validate: Callable[[list[int]], float]  # task indices -> one score where higher is better
    scaler: torch.amp.GradScaler | None = None
    # ``Boundary.state_dict()`` plus ``"best"`` (best weights): continue the task from there (``before_task``
    # is not called again; the strategy's own state was restored by the caller)
    resume: dict[str, Any] | None = None
    callbacks: LoopCallbacks = field(default_factory=LoopCallbacks)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and norms; the fused kernel on CUDA."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def micro_batches(examples: list[Encoded], size: int, generator: torch.Generator) -> list[list[Encoded]]:
    order = torch.randperm(len(examples), generator=generator).tolist()
    return [[examples[i] for i in order[k : k + size]] for k in range(0, len(order), size)]


def read_extras(extras: dict[str, Any]) -> dict[str, float]:
    """What strategies logged (floats, 0-dim tensors) as floats, converted in place so each is read once."""
    for name, value in extras.items():
        if not isinstance(value, float):
            extras[name] = float(value)
    return dict(extras)


def train_task(job: TaskRun) -> list[EpochRecord]:
    """Train ``job.ctx.model`` on one task; returns the records of all its epochs (resumed ones included)."""
    ctx, strategy = job.ctx, job.strategy
    if job.resume is None:
        strategy.before_task(ctx)
    trainer = _TaskTrainer(job, strategy.train_dataset(ctx, job.examples))
    trainer.train()
    if trainer.best_state is not None:
        ctx.model.load_state_dict(trainer.best_state)
    strategy.after_task(ctx)
    return [EpochRecord(**r) for r in trainer.state.records]


class _TaskTrainer:
    """The optimizer, schedule and position of one task; ``train`` runs its remaining epochs."""

    def __init__(self, job: TaskRun, examples: list[Encoded]) -> None:
        ctx, cfg = job.ctx, job.cfg
        self.job, self.ctx, self.cfg, self.examples = job, ctx, cfg, examples
        self.micro = cfg.batch_size // cfg.grad_accum
        steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
        self.total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
        self.epochs = math.ceil(self.total_steps / steps_per_epoch)
        self.optimizer = make_optimizer(ctx.model, cfg, ctx.device)
        self.scheduler = linear_schedule(self.optimizer, self.total_steps, cfg.warmup_ratio)
        self.state, self.best_state = LoopState(), None
        if job.resume is not None:
            self.optimizer.load_state_dict(job.resume["optimizer"])
            self.scheduler.load_state_dict(job.resume["scheduler"])
            if job.scaler is not None and job.resume["scaler"] is not None:
                job.scaler.load_state_dict(job.resume["scaler"])
            self.state, self.best_state = LoopState(**job.resume["loop"]), job.resume.get("best")
        ctx.optimizer, ctx.step = self.optimizer, self.state.step
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        self.validation_tasks = job.strategy.validation_tasks(ctx)

    def train(self) -> None:
        self.ctx.model.train()
        self.job.callbacks.on_step({"event": "task_start", "total_steps": self.total_steps, "epochs": self.epochs,
                                    "step": self.state.step})
        for epoch in range(self.state.epoch, self.epochs):
            self._train_epoch(epoch)
            self._end_epoch(epoch)

    def _train_epoch(self, epoch: int) -> None:
        """The epoch's optimizer steps (those left of it on resume), until its data or the step budget ends."""
        ctx, state, strategy = self.ctx, self.state, self.job.strategy
        ctx.epoch = epoch
        started = time.perf_counter()
        strategy.before_epoch(ctx)
        epoch_batches = micro_batches(self.examples, self.micro, ctx.generator(salt=100_000 + epoch))
        batches = iter(strategy.train_batches(ctx, epoch_batches[state.batches_done :]))
        while ctx.step < self.total_steps:
            group = [ctx.collate(b) for _, b in zip(range(self.cfg.grad_accum), batches, strict=False)]
            if not group:
                break
            step_loss = self._step(group, epoch)
            state.step, state.batches_done = ctx.step, state.batches_done + len(group)
            state.loss_sum, state.loss_steps = state.loss_sum + step_loss, state.loss_steps + 1
            elapsed = state.seconds + time.perf_counter() - started
            self.job.callbacks.on_step({"event": "step", "step": ctx.step, "epoch": epoch + 1, "loss": step_loss,
                                        "tokens_per_s": state.tokens / max(elapsed, 1e-9),
                                        "extras": dict(ctx.extras)})
            self._boundary("step")
        strategy.after_epoch(ctx)  # also when the step budget, not the data, ended the epoch
        state.seconds += time.perf_counter() - started

    def _step(self, group: list[dict[str, torch.Tensor]], epoch: int) -> float:
        """One optimizer step over the micro-batches of ``group``; returns its loss."""
        ctx, strategy, scaler = self.ctx, self.job.strategy, self.job.scaler
        step_tokens = sum(int(target_mask(b["labels"]).sum()) for b in group)
        step_loss = 0.0
        for batch in group:
            with ctx.autocast():
                outputs = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                loss = causal_lm_loss(outputs.logits, batch["labels"])
                loss = strategy.loss(ctx, batch, outputs, loss)
            weight = int(target_mask(batch["labels"]).sum()) / max(step_tokens, 1)
            (scaler.scale(loss * weight) if scaler else loss * weight).backward()
            step_loss += float(loss.detach()) * weight
            self.state.tokens += int(batch["attention_mask"].sum())
        read_extras(ctx.extras)  # the loss was just read: the device is in sync, logged tensors cost no more
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"non-finite loss ({step_loss}) in task {ctx.task_name!r}, epoch {epoch + 1}, step {ctx.step + 1}"
            )
        if scaler:
            scaler.unscale_(self.optimizer)
        strategy.after_backward(ctx)
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if scaler:
            scale = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            self.state.skipped += int(scaler.get_scale() < scale)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        ctx.step += 1
        strategy.after_step(ctx)
        return step_loss

    def _end_epoch(self, epoch: int) -> None:
        """Validate, keep the best weights, record the epoch and hand the boundary to the caller."""
        ctx, state = self.ctx, self.state
        score = self.job.validate(self.validation_tasks) if self.cfg.keep_best else None
        if score is not None and score > state.best_score:
            state.best_score = score
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in ctx.model.state_dict().items()}
        record = EpochRecord(
            task=ctx.task_name, task_index=ctx.task_index, epoch=epoch + 1, step=ctx.step,
            train_loss=state.loss_sum / max(state.loss_steps, 1), validation_score=score,
            tokens_per_s=state.tokens / max(state.seconds, 1e-9), seconds=state.seconds,
            lr=self.scheduler.get_last_lr()[0], skipped_steps=state.skipped, extras=read_extras(ctx.extras),
        )
        state.records.append(asdict(record))
        state.epoch, state.batches_done = epoch + 1, 0
        state.loss_sum, state.loss_steps, state.tokens, state.seconds, state.skipped = 0.0, 0, 0, 0.0, 0
        self.job.callbacks.on_epoch(record)
        ctx.model.train()
        self._boundary("epoch")

    def _boundary(self, kind: str) -> None:
        self.job.callbacks.on_boundary(
            Boundary(self.state, self.optimizer, self.scheduler, self.job.scaler, self.best_state, kind))
