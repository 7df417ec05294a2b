"""Train one task: AdamW, linear warmup + decay, gradient accumulation, clipping, autocast, strategy hooks.

The loss of a micro-batch is its mean over target tokens; before backward it is weighted by the micro-batch's
share of the optimizer step's target tokens, so ``grad_accum`` micro-batches give exactly the gradient of one
large batch. After each epoch the validation score is computed; with ``keep_best`` the best epoch's weights are
restored at the end of the task.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

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
) -> list[EpochRecord]:
    """Train ``ctx.model`` on one task. ``validate(task_indices)`` returns a score where higher is better."""
    model = ctx.model
    strategy.before_task(ctx)
    examples = strategy.train_dataset(ctx, examples)
    micro = cfg.batch_size // cfg.grad_accum
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = make_optimizer(model, cfg, ctx.device)
    scheduler = linear_schedule(optimizer, total_steps, cfg.warmup_ratio)
    ctx.optimizer, ctx.step = optimizer, 0
    params = [p for p in model.parameters() if p.requires_grad]
    validation_tasks = strategy.validation_tasks(ctx)
    best_score, best_state = -math.inf, None
    records: list[EpochRecord] = []
    model.train()
    on_step({"event": "task_start", "total_steps": total_steps, "epochs": epochs})
    for epoch in range(epochs):
        ctx.epoch = epoch
        started, tokens, loss_sum, loss_steps, skipped = time.perf_counter(), 0, 0.0, 0, 0
        batches = iter(strategy.train_batches(ctx, micro_batches(examples, micro, ctx.generator(salt=100_000 + epoch))))
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
                tokens += int(batch["attention_mask"].sum())
            if not math.isfinite(step_loss):
                raise FloatingPointError(
                    f"non-finite loss in task {ctx.task_name!r}, epoch {epoch + 1}, step {ctx.step + 1}"
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
                skipped += scaler.get_scale() < scale
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ctx.step += 1
            strategy.after_step(ctx)
            loss_sum, loss_steps = loss_sum + step_loss, loss_steps + 1
            elapsed = time.perf_counter() - started
            on_step({"event": "step", "step": ctx.step, "epoch": epoch + 1, "loss": step_loss,
                     "tokens_per_s": tokens / max(elapsed, 1e-9)})
        seconds = time.perf_counter() - started
        score = validate(validation_tasks) if cfg.keep_best else None
        if score is not None and score > best_score:
            best_score = score
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        record = EpochRecord(
            task=ctx.task_name, task_index=ctx.task_index, epoch=epoch + 1, step=ctx.step,
            train_loss=loss_sum / max(loss_steps, 1), validation_score=score,
            tokens_per_s=tokens / max(seconds, 1e-9), seconds=seconds, lr=scheduler.get_last_lr()[0],
            skipped_steps=int(skipped),
        )
        records.append(record)
        on_epoch(record)
        model.train()
    if best_state is not None:
        model.load_state_dict(best_state)
    strategy.after_task(ctx)
    return records
