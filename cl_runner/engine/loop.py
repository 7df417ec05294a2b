"""Train one task: AdamW, linear warmup + decay, gradient accumulation, clipping, autocast, strategy hooks.

Batches. An epoch's data order is a seeded permutation cut into optimizer-step batches of ``batch_size``
examples. The strategy's ``train_batches`` sees these step batches (replay adds its buffer examples to them),
and only then is each cut into ``grad_accum`` micro-batches (sizes differing by at most one). The loss of a
micro-batch is its mean over target tokens, weighted before backward by the micro-batch's share of the step's
target tokens (counted on the host from the examples' labels, before anything is sent to the device), so the
gradient is that of one large batch and nothing a strategy draws depends on ``grad_accum``. What still differs
between ``grad_accum`` values: float rounding (sums in another order, other padded shapes), and dropout, whose
masks are drawn per micro-batch, in the micro-batch's shape, from the global RNG stream: with dropout on, the
masks (not their distribution) change with ``grad_accum``. With dropout off, the results agree up to rounding.
With ``train.pack`` each micro-batch's examples are concatenated into rows of at most ``max_length`` tokens
(``lm.pack``, a pure function of the micro-batch): same targets, same weights, same loss up to rounding.

Host syncs. Nothing in a step reads the device: each step's loss stays a device tensor until the loop reads the
pending ones (one sync) every ``log_every`` steps, at the end of an epoch and when the caller checkpoints
(``Boundary.state_dict``). The read checks every loss is finite (the error names the first bad step and the
steps read), adds them to the epoch's sums in step order (so where reads fall never changes a sum), converts
what strategies logged, and sends a ``step`` event (loss and speed on the progress bar) for the steps read at a
``log_every`` mark; the bar itself moves after every step (``on_progress``, no device read).

History. ``seconds`` is the epoch's training time, without validation and without the time the callbacks take
(checkpoints, progress bar). ``tokens_per_s`` counts the real (non-padding) tokens of the batches trained on,
replayed and pseudo-examples included, not the extra forward passes of a strategy (a teacher, LAMOL's generation
pass), over all ranks; ``target_tokens_per_s`` only the tokens the loss is computed on; ``mfu`` is computed from
``tokens_per_s`` (``flops.py``; None on CPU or an unknown GPU). After each validated epoch,
``keep_best`` keeps the best weights and restores them at the end of the task.

Everything needed to continue a task lives in ``LoopState`` plus the optimizer, scheduler, scaler and best
weights, handed to ``LoopCallbacks.on_boundary`` after every optimizer step and every epoch: the caller
checkpoints there, and ``TaskRun.resume`` continues bit-for-bit (the epoch's data order is recomputed from the
seed and the step batches already trained on are skipped before the strategy sees them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cl_runner.config.schema import DistributedConfig, TrainConfig
from cl_runner.core.dist import all_reduce_sum, world
from cl_runner.engine.flops import flops_per_token, mfu, peak_flops
from cl_runner.engine.parallel import gradient_sync, train_module
from cl_runner.models.lm import Encoded, causal_lm_loss, target_count, token_counts
from cl_runner.models.load import trainable_count
from cl_runner.strategies.base import Context, MicroBatch, Strategy

GROUP_WINDOW = 50  # train.group_by_length sorts by length within windows of this many step batches


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
    mfu: float | None = None  # model FLOPs utilisation (flops.py); None on CPU or a GPU without a known peak
    target_tokens_per_s: float | None = None  # the tokens the loss is computed on, per second (None: older runs)
    validation_seconds: float | None = None  # the validation after this epoch; None when not validated
    tokens: int | None = None  # tokens of the batches trained on (as tokens_per_s counts them; None: older runs)
    target_tokens: int | None = None  # the target tokens among them (the positions the loss is computed on)
    extras: dict[str, float] = field(default_factory=dict)  # the latest values strategies logged (ctx.log)


@dataclass
class LoopState:
    """Position inside one task and the running sums of the current epoch."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken in this task
    batches_done: int = 0  # step batches (optimizer steps) of the current epoch already trained on
    best_score: float = -math.inf
    loss_sum: float = 0.0
    loss_steps: int = 0
    tokens: int = 0
    targets: int = 0  # target tokens (the positions the loss is computed on)
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
    read: Callable[[], None] = lambda: None  # brings ``loop`` up to date (reads the pending losses)

    def state_dict(self) -> dict[str, Any]:
        self.read()
        return {"loop": asdict(self.loop), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}


class LoopCallbacks:
    """What the caller hears from ``train_task``; every method is a no-op here: override the ones you need."""

    def on_step(self, event: dict[str, Any]) -> None:
        """Once ``{"event": "task_start", "total_steps", "epochs", "step", "trainable"}`` (parameters the task's
        optimizer updates), then every ``train.log_every``
        steps and at the end of each epoch ``{"event": "step", "step", "epoch", "loss", "tokens_per_s", "mfu",
        "extras"}`` (``loss``: the mean over the steps since the previous event)."""

    def on_progress(self, step: int, epoch: int) -> None:
        """After every optimizer step (``epoch`` 1-based), before any ``step`` event of it: a bar that moves per
        step; nothing is read from the device for it."""

    def on_epoch(self, record: EpochRecord) -> None:
        """An epoch is finished (and validated when due); ``record`` is its line of history.jsonl."""

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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # the DDP options (parallel.py)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and norms; the fused kernel on CUDA and CPU, else foreach."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused, foreach=None if fused else True)


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_batches(examples: list[Encoded], size: int, generator: torch.Generator,
                 group_by_length: bool = False) -> list[list[Encoded]]:
    """One epoch's optimizer-step batches: a seeded permutation of ``examples`` cut every ``size``.

    ``group_by_length``: the permutation is sorted by length within windows of ``GROUP_WINDOW`` batches before
    it is cut (less padding), and the batches are then shuffled (the same generator), so batch order stays random.
    """
    order = torch.randperm(len(examples), generator=generator).tolist()
    if group_by_length:
        window = size * GROUP_WINDOW
        order = [i for k in range(0, len(order), window)
                 for i in sorted(order[k : k + window], key=lambda i: len(examples[i]["input_ids"]))]
    batches = [[examples[i] for i in order[k : k + size]] for k in range(0, len(order), size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def split(batch: list[Encoded], parts: int) -> list[list[Encoded]]:
    """``batch`` cut into ``parts`` consecutive micro-batches whose sizes differ by at most one (none empty)."""
    size, extra = divmod(len(batch), parts)
    ends = [(i + 1) * size + min(i + 1, extra) for i in range(parts)]
    return [batch[start:end] for start, end in zip([0, *ends], ends, strict=False) if end > start]


def weighted(micro: list[list[Encoded]]) -> list[tuple[list[Encoded], float]]:
    """Each micro-batch with its share of the step's target tokens (equal shares when the step has none)."""
    counts = [sum(target_count(e) for e in examples) for examples in micro]
    total = sum(counts)
    return [(examples, count / total if total else 1 / len(micro)) for examples, count in zip(micro, counts,
                                                                                               strict=True)]


def local_share(batch: list[Encoded], grad_accum: int, rank: int = 0,
                size: int = 1) -> list[tuple[list[Encoded], float]]:
    """This rank's micro-batches of an optimizer step, each with its share of the WHOLE step's target tokens.

    The step batch is cut into ``size`` consecutive slices (sizes differing by at most one), one per rank in rank
    order, and each slice into ``grad_accum`` micro-batches; with one process this is ``weighted(split(batch))``.
    The shares of all ranks' micro-batches sum to one, so the step's gradient is the same at any process count.
    A rank whose slice is empty (a step batch smaller than the number of ranks) still runs one forward and
    backward, on the step's first example with weight 0: every rank must join the gradient reduction."""
    from cl_runner.core.dist import shard_bounds

    slices = [batch[slice(*shard_bounds(len(batch), r, size))] for r in range(size)]
    cuts = [split(part, grad_accum) for part in slices]
    shares = iter(weighted([micro for cut in cuts for micro in cut]))
    mine = [next(shares) for cut in cuts[: rank + 1] for _ in cut][-len(cuts[rank]) :] if cuts[rank] else []
    return mine or [(batch[:1], 0.0)]


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
        steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
        self.total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
        self.epochs = math.ceil(self.total_steps / steps_per_epoch)
        self.optimizer = make_optimizer(ctx.model, cfg, ctx.device)
        self.trainable = trainable_count(ctx.model)  # what this task's optimizer updates
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
        self.world = world()
        self.module = train_module(ctx.model, self.world, job.distributed, ctx.device)  # DDP: the wrapper
        self.validation_tasks = job.strategy.validation_tasks(ctx)
        self.flops, self.peak = flops_per_token(ctx.model), peak_flops(ctx.device)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (step, loss, skipped) unread
        self.window: list[float] = []  # losses read since the last step event
        self.mark = time.perf_counter()  # training time is counted from here (reset after every callback)

    def train(self) -> None:
        self.ctx.model.train()
        self.job.callbacks.on_step({"event": "task_start", "total_steps": self.total_steps, "epochs": self.epochs,
                                    "step": self.state.step, "trainable": self.trainable})
        for epoch in range(self.state.epoch, self.epochs):
            self._train_epoch(epoch)
            self._end_epoch(epoch)

    def _train_epoch(self, epoch: int) -> None:
        """The epoch's optimizer steps (those left of it on resume), until its data or the step budget ends."""
        ctx, state, strategy = self.ctx, self.state, self.job.strategy
        ctx.epoch, self.mark = epoch, time.perf_counter()
        strategy.before_epoch(ctx)
        epoch_batches = step_batches(self.examples, self.cfg.batch_size, ctx.generator(salt=100_000 + epoch),
                                     self.cfg.group_by_length)
        batches: Iterator[list[Encoded]] = iter(strategy.train_batches(ctx, epoch_batches[state.batches_done :]))
        while ctx.step < self.total_steps and (batch := next(batches, None)) is not None:
            self._step(batch)
            state.step, state.batches_done = ctx.step, state.batches_done + 1
            logging = ctx.step % self.cfg.log_every == 0
            if logging:
                self._read()
            self._tick()
            self.job.callbacks.on_progress(ctx.step, epoch + 1)  # its time is not training time (_boundary)
            if logging:
                self._report(epoch)
            self._boundary("step")
        strategy.after_epoch(ctx)  # also when the step budget, not the data, ended the epoch
        self._read()
        self._tick()
        if self.window:
            self._report(epoch)

    def _step(self, batch: list[Encoded]) -> None:
        """One optimizer step over ``batch``: this rank's slice of it (``local_share``), cut into micro-batches;
        its loss (this rank's part of the step's loss) is left on the device."""
        ctx, strategy = self.ctx, self.job.strategy
        micro = local_share(batch, self.cfg.grad_accum, self.world.rank, self.world.size)
        losses = [self._micro_step(examples, batch, weight, last=k == len(micro) - 1)
                  for k, (examples, weight) in enumerate(micro)]
        ctx.micro = None
        tokens, targets = token_counts(batch)
        self.state.tokens, self.state.targets = self.state.tokens + tokens, self.state.targets + targets
        skipped = self._optimizer_step()
        self.pending.append((ctx.step + 1, torch.stack(losses).sum(), skipped))
        ctx.step += 1
        strategy.after_step(ctx)

    def _micro_step(self, examples: list[Encoded], step: list[Encoded], weight: float, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its weighted loss (detached, on the device). The
        gradient is multiplied by the number of ranks, which DDP and FSDP average over: the sum over ranks of
        the weighted micro-batch gradients is the step's gradient, as in one process."""
        ctx, scaler = self.ctx, self.job.scaler
        pack_length = self.cfg.max_length if self.cfg.pack else None
        ctx.micro = MicroBatch(examples, step, weight, pack_length)
        # the batch as the model's kind reads it: packed rows (lm.pack), or an encoder-decoder's two sides
        batch, inputs = ctx.kind.training_batch(examples, ctx.collate, pack_length)
        with ctx.autocast():
            outputs = self.module(**inputs)
            loss = causal_lm_loss(outputs.logits, batch["labels"], self.cfg.loss_chunk_tokens)
            loss = self.job.strategy.loss(ctx, batch, outputs, loss)
        scaled = loss * (weight * self.world.size)
        with gradient_sync(self.module, last):
            (scaler.scale(scaled) if scaler else scaled).backward()
        return loss.detach().float() * weight

    def _optimizer_step(self) -> torch.Tensor | None:
        """Unscale, gradient surgery, clipping, the step; returns (fp16) whether the scaler skipped it."""
        scaler, skipped = self.job.scaler, None
        if scaler:
            scaler.unscale_(self.optimizer)
        self.job.strategy.after_backward(self.ctx)
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if scaler:
            scale = scaler._get_scale_async().clone()  # a device tensor: comparing it later costs no sync
            scaler.step(self.optimizer)
            scaler.update()
            skipped = scaler._get_scale_async() < scale
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return skipped

    def _read(self) -> None:
        """Read the pending steps' losses (one device sync), check them, add them to the epoch's sums."""
        if not self.pending:
            return
        steps = [step for step, _, _ in self.pending]
        values = all_reduce_sum(torch.stack([loss for _, loss, _ in self.pending])).tolist()  # the ranks' parts
        skips = [bool(s) for _, _, s in self.pending if s is not None]
        self.pending = []
        for step, value in zip(steps, values, strict=True):
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"non-finite loss ({value}) in task {self.ctx.task_name!r}, epoch {self.ctx.epoch + 1}, step "
                    f"{step} (losses are read every train.log_every={self.cfg.log_every} steps; this read covered "
                    f"steps {steps[0]}-{steps[-1]})")
            self.state.loss_sum, self.state.loss_steps = self.state.loss_sum + value, self.state.loss_steps + 1
        self.state.skipped += sum(skips)
        self.window.extend(values)
        read_extras(self.ctx.extras)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.state.seconds += now - self.mark
        self.mark = now

    def _report(self, epoch: int) -> None:
        """The ``step`` event of the steps read since the last one (the progress bar)."""
        ctx, state = self.ctx, self.state
        loss, self.window = sum(self.window) / len(self.window), []
        speed = state.tokens / max(state.seconds, 1e-9)
        self.job.callbacks.on_step({"event": "step", "step": ctx.step, "epoch": epoch + 1, "loss": loss,
                                    "tokens_per_s": speed, "mfu": mfu(self.flops, speed, self.peak),
                                    "extras": dict(ctx.extras)})
        self.mark = time.perf_counter()

    def _end_epoch(self, epoch: int) -> None:
        """Validate, keep the best weights, record the epoch and hand the boundary to the caller."""
        ctx, state = self.ctx, self.state
        started = time.perf_counter()
        score = self.job.validate(self.validation_tasks) if self.cfg.validates(epoch + 1, self.epochs) else None
        validation_seconds = None if score is None else round(time.perf_counter() - started, 3)
        if score is not None and score > state.best_score:
            state.best_score = score
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in ctx.model.state_dict().items()}
        speed = state.tokens / max(state.seconds, 1e-9)
        record = EpochRecord(
            task=ctx.task_name, task_index=ctx.task_index, epoch=epoch + 1, step=ctx.step,
            train_loss=state.loss_sum / max(state.loss_steps, 1), validation_score=score, tokens_per_s=speed,
            seconds=state.seconds, lr=self.scheduler.get_last_lr()[0], skipped_steps=state.skipped,
            mfu=mfu(self.flops, speed, self.peak), extras=read_extras(ctx.extras),
            target_tokens_per_s=state.targets / max(state.seconds, 1e-9), validation_seconds=validation_seconds,
            tokens=state.tokens, target_tokens=state.targets,
        )
        state.records.append(asdict(record))
        state.epoch, state.batches_done = epoch + 1, 0
        state.loss_sum, state.loss_steps, state.tokens, state.seconds, state.skipped = 0.0, 0, 0, 0.0, 0
        state.targets = 0
        self.job.callbacks.on_epoch(record)
        ctx.model.train()
        self._boundary("epoch")

    def _boundary(self, kind: str) -> None:
        self.job.callbacks.on_boundary(Boundary(self.state, self.optimizer, self.scheduler, self.job.scaler,
                                                self.best_state, kind, self._read))
        self.mark = time.perf_counter()
