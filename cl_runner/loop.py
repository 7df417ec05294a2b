"""Train one task: AdamW, linear warmup + decay, gradient accumulation, clipping, autocast, strategy hooks.

The loss of a micro-batch is its mean over target tokens; before backward it is weighted by the micro-batch's
share of the optimizer step's target tokens, so ``grad_accum`` micro-batches give exactly the gradient of one
large batch. After each epoch the validation score is computed; with ``keep_best`` the best epoch's weights are
restored at the end of the task.

Everything needed to continue a task lives in ``LoopState`` plus the optimizer, scheduler, scaler and best
weights, handed to ``on_boundary`` after every optimizer step and every epoch: the caller checkpoints there,
and ``resume`` continues bit-for-bit (the epoch's data order is recomputed from the seed and the micro-batches
already consumed are skipped before the strategy sees them).
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


def train_task(
    ctx: Context,
    strategy: Strategy,
    examples: list[Encoded],
    cfg: TrainConfig,
    validate: Callable[[list[int]], float],
    on_step: Callable[[dict], None] = lambda info: None,
    on_epoch: Callable[[EpochRecord], None] = lambda record: None,
    scaler: torch.amp.GradScaler | None = None,
    on_boundary: Callable[[Boundary], None] = lambda boundary: None,
    resume: dict[str, Any] | None = None,
) -> list[EpochRecord]:
    """Train ``ctx.model`` on one task. ``validate(task_indices)`` returns a score where higher is better.

    ``resume`` is a ``Boundary.state_dict()`` plus ``"best"`` (best weights): the task continues from there
    (``before_task`` is not called again; the strategy's own state was restored by the caller).
    """
    model = ctx.model
    if resume is None:
        strategy.before_task(ctx)
    examples = strategy.train_dataset(ctx, examples)
    micro = cfg.batch_size // cfg.grad_accum
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = make_optimizer(model, cfg, ctx.device)
    scheduler = linear_schedule(optimizer, total_steps, cfg.warmup_ratio)
    state, best_state = LoopState(), None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume["scaler"] is not None:
            scaler.load_state_dict(resume["scaler"])
        state, best_state = LoopState(**resume["loop"]), resume.get("best")
    ctx.optimizer, ctx.step = optimizer, state.step
    params = [p for p in model.parameters() if p.requires_grad]
    validation_tasks = strategy.validation_tasks(ctx)

    def boundary(kind: str) -> None:
        on_boundary(Boundary(state, optimizer, scheduler, scaler, best_state, kind))

    model.train()
    on_step({"event": "task_start", "total_steps": total_steps, "epochs": epochs, "step": state.step})
    for epoch in range(state.epoch, epochs):
        ctx.epoch = epoch
        started = time.perf_counter()
        epoch_batches = micro_batches(examples, micro, ctx.generator(salt=100_000 + epoch))
        batches = iter(strategy.train_batches(ctx, epoch_batches[state.batches_done :]))
        while ctx.step < total_steps:
            group = [ctx.collate(b) for _, b in zip(range(cfg.grad_accum), batches, strict=False)]
            if not group:
                break
            step_tokens = sum(int(target_mask(b["labels"]).sum()) for b in group)
            step_loss = 0.0
            for batch in group:
                with ctx.autocast():
                    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    loss = causal_lm_loss(outputs.logits, batch["labels"])
                    loss = strategy.loss(ctx, batch, outputs, loss)
                weight = int(target_mask(batch["labels"]).sum()) / max(step_tokens, 1)
                (scaler.scale(loss * weight) if scaler else loss * weight).backward()
                step_loss += float(loss.detach()) * weight
                state.tokens += int(batch["attention_mask"].sum())
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"non-finite loss ({step_loss}) in task {ctx.task_name!r}, epoch {epoch + 1}, step {ctx.step + 1}"
                )
            if scaler:
                scaler.unscale_(optimizer)
            strategy.after_backward(ctx)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                state.skipped += int(scaler.get_scale() < scale)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ctx.step += 1
            strategy.after_step(ctx)
            state.step, state.batches_done = ctx.step, state.batches_done + len(group)
            state.loss_sum, state.loss_steps = state.loss_sum + step_loss, state.loss_steps + 1
            elapsed = state.seconds + time.perf_counter() - started
            on_step({"event": "step", "step": ctx.step, "epoch": epoch + 1, "loss": step_loss,
                     "tokens_per_s": state.tokens / max(elapsed, 1e-9)})
            boundary("step")
        state.seconds += time.perf_counter() - started
        score = validate(validation_tasks) if cfg.keep_best else None
        if score is not None and score > state.best_score:
            state.best_score = score
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        record = EpochRecord(
            task=ctx.task_name, task_index=ctx.task_index, epoch=epoch + 1, step=ctx.step,
            train_loss=state.loss_sum / max(state.loss_steps, 1), validation_score=score,
            tokens_per_s=state.tokens / max(state.seconds, 1e-9), seconds=state.seconds,
            lr=scheduler.get_last_lr()[0], skipped_steps=state.skipped,
        )
        state.records.append(asdict(record))
        state.epoch, state.batches_done = epoch + 1, 0
        state.loss_sum, state.loss_steps, state.tokens, state.seconds, state.skipped = 0.0, 0, 0, 0.0, 0
        on_epoch(record)
        model.train()
        boundary("epoch")
    if best_state is not None:
        model.load_state_dict(best_state)
    strategy.after_task(ctx)
    return [EpochRecord(**r) for r in state.records]
