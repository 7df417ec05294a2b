"""A bounded replay buffer of encoded examples (host memory only), the sampling rules that fill it, the options of
every strategy that keeps one (``BufferConfig``) and the base of those that compute gradients on it but never train
on it (``BufferGradients``: A-GEM, GEM, DER).

Which examples a finished task leaves in the buffer (``sampling``):

- ``reservoir``: Algorithm R over the stream of every training example seen, task after task. Each example
  seen so far is in the buffer with the same probability ``buffer_size / seen``, so tasks are represented in
  proportion to their size. With ``per_task`` each task runs its own Algorithm R into its share instead.
- ``random``: a uniform random subset of the task's examples, of the task's share.
- ``importance``: ``pool`` = a uniform random subset of the task of ``CANDIDATES_PER_SLOT * share`` examples
  (all of them when the task is smaller), so the proposal ``Q(x)`` is uniform over the task. Each candidate
  gets ``w(x) = P(x) / Q(x)`` with ``P(x) ∝ exp(-loss(x))``, ``loss(x)`` the model's mean target-token NLL
  of ``x`` after the task (``example_losses``); the weights are normalised in log space (a softmax of
  ``-loss - log Q``). The share is drawn from the pool without replacement, each draw picking a remaining
  candidate with probability proportional to its ``w`` (``torch.multinomial``). Low-loss (typical,
  well-learnt) examples are preferred.
- ``hardest``: the ``share`` highest-loss examples of the same uniform pool.

Shares (every mode but global reservoir): with ``per_task`` every task seen gets an equal share of
``buffer_size``, otherwise shares are proportional to the number of examples seen per task; in both cases a
task smaller than its share keeps all its examples and the rest is split among the others (largest
remainder, earlier tasks first on ties). When a new task arrives the old tasks' shares shrink: ``hardest``
drops their lowest-loss examples, every other mode drops a uniform random subset (a uniform subsample keeps
each mode's distribution). The new task then fills every free slot (its share, plus any slot rounding left,
as old tasks' shares never grow back).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_choice, check_positive
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import Encoded, target_mask, token_nll
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, Strategy, StrategyConfig
from cl_runner.strategies.common import evaluating
from cl_runner.strategies.support import Supports

SAMPLINGS = ("reservoir", "random", "importance", "hardest")
GRADIENT_FILL_SALT = 61  # BufferGradients' ctx.generator salts: which examples a task leaves in the buffer
GRADIENT_DRAW_SALT = 62  # ... and which buffer examples make each step's reference gradients


@dataclass
class BufferConfig(StrategyConfig):
    """The options of every strategy that keeps a ``ReplayBuffer`` (replay and what builds on it, der, agem, gem)."""

    buffer_size: int = 200  # examples kept in total, over all tasks
    sampling: str = "reservoir"  # reservoir | random | importance | hardest (buffer.py)
    per_task: bool = False  # equal share of the buffer per task seen

    def buffer_errors(self, errs: list[str], key: str) -> None:
        check_positive(errs, f"{key}.buffer_size", self.buffer_size)
        check_choice(errs, f"{key}.sampling", self.sampling, SAMPLINGS)
CANDIDATES_PER_SLOT = 8  # importance / hardest score at most this many candidates per buffer slot of the task


@no_grad
def example_losses(ctx: Context, examples: Sequence[Encoded], batch_size: int = 32) -> torch.Tensor:
    """Mean target-token NLL of each example under ``ctx.model`` (eval mode, no grad); CPU float32."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    losses = torch.empty(len(examples), dtype=torch.float32)
    with evaluating(ctx.model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            part = [examples[i] for i in rows]
            batch = ctx.kind.model_batch(ctx.collate(part), part)  # as the model's kind reads it
            with ctx.autocast():
                out = ctx.model(**ctx.kind.model_inputs(batch))
            targets = target_mask(batch["labels"]).sum(1).clamp_min(1)
            losses[rows] = (token_nll(out.logits, batch["labels"]).sum(1) / targets).float().cpu()
    return losses


def importance_weights(losses: torch.Tensor, log_proposal: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised ``w = P/Q``, ``P ∝ exp(-losses)``; ``log_proposal``: log Q per candidate (None: uniform)."""
    log_w = -losses.double()
    if log_proposal is not None:
        log_w = log_w - log_proposal.double()
    return torch.softmax(log_w, 0)


def task_quotas(seen: dict[int, int], capacity: int, equal: bool) -> dict[int, int]:
    """Buffer share per task: equal or proportional to ``seen``, capped at ``seen``, the excess shared out."""
    quotas: dict[int, int] = {}
    active, remaining = [t for t in sorted(seen) if seen[t] > 0], capacity
    while active and remaining > 0:
        weights = [1.0 if equal else float(seen[t]) for t in active]
        exact = [remaining * w / sum(weights) for w in weights]
        share = [math.floor(x) for x in exact]
        for i in sorted(range(len(active)), key=lambda i: share[i] - exact[i])[: remaining - sum(share)]:
            share[i] += 1  # largest remainder first; sort is stable, so earlier tasks win ties
        capped = [t for t, s in zip(active, share, strict=True) if s >= seen[t]]
        if not capped:
            quotas.update(zip(active, share, strict=True))
            break
        for t in capped:
            quotas[t] = seen[t]
            remaining -= seen[t]
        active = [t for t in active if t not in capped]
    return {t: quotas.get(t, 0) for t in seen}


def _host_copy(example: Encoded) -> Encoded:
    """A copy made of Python ints: the buffer never holds device memory nor aliases the task's lists."""
    return {k: (v.tolist() if torch.is_tensor(v) else list(v) if isinstance(v, list) else v)
            for k, v in example.items()}  # type: ignore[return-value]


class ReplayBuffer:
    """At most ``size`` encoded examples, with the task and (when scored) the loss each was kept with."""

    def __init__(self, size: int, sampling: str = "reservoir", per_task: bool = False) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling: expected one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        self.size, self.sampling, self.per_task = size, sampling, per_task
        self.examples: list[Encoded] = []
        self.tasks: list[int] = []
        self.scores: list[float] = []  # loss when kept (importance / hardest), nan otherwise
        self.seen: dict[int, int] = {}  # training examples seen per task
        self.seen_total = 0  # Algorithm R's counter over every example seen

    def __len__(self) -> int:
        return len(self.examples)

    def add_task(self, task: int, examples: Sequence[Encoded], generator: torch.Generator,
                 score: Callable[[list[Encoded]], torch.Tensor] | None = None) -> None:
        """Offer a finished task's examples; ``score`` returns their losses (needed by importance/hardest)."""
        self.seen[task] = self.seen.get(task, 0) + len(examples)
        self.seen_total += len(examples)
        if self.sampling == "reservoir" and not self.per_task:
            before = self.seen_total - len(examples)
            self._reservoir(task, examples, self.size, before, list(range(len(self))), generator)
            return
        quotas = task_quotas(self.seen, self.size, equal=self.per_task)
        for old in sorted(set(self.tasks) - {task}):
            self._shrink(old, quotas[old], generator)
        free = self.size - len(self)  # the new task's share, plus slack a rounding may have left
        if self.sampling == "reservoir":
            mine = [i for i, t in enumerate(self.tasks) if t == task]
            before = self.seen[task] - len(examples)
            self._reservoir(task, examples, len(mine) + free, before, mine, generator)
            return
        quota = min(free, len(examples))
        if quota <= 0:
            return
        pool_size = len(examples) if self.sampling == "random" else CANDIDATES_PER_SLOT * quota
        pool = torch.randperm(len(examples), generator=generator)[: min(len(examples), pool_size)].tolist()
        if self.sampling == "random":
            chosen, losses = pool[:quota], [math.nan] * min(quota, len(pool))
        else:
            if score is None:
                raise ValueError(f"sampling={self.sampling} needs a score function (per-example losses)")
            pool_losses = score([examples[i] for i in pool]).double().cpu()
            if self.sampling == "hardest":
                picks = torch.argsort(pool_losses, descending=True, stable=True)[:quota]
            else:  # uniform proposal over the task: log Q is the same constant for every candidate
                picks = torch.multinomial(importance_weights(pool_losses), min(quota, len(pool)),
                                          replacement=False, generator=generator)
            chosen, losses = [pool[i] for i in picks.tolist()], pool_losses[picks].tolist()
        for i, loss in zip(chosen, losses, strict=True):
            self._append(task, examples[i], loss)

    def _append(self, task: int, example: Encoded, score: float) -> None:
        self.examples.append(_host_copy(example))
        self.tasks.append(task)
        self.scores.append(score)

    def _reservoir(self, task: int, examples: Sequence[Encoded], capacity: int, seen_before: int,
                   slots: list[int], generator: torch.Generator) -> None:
        """Algorithm R: the k-th example seen (k > capacity) replaces slot j ~ U{0..k-1} when j < capacity."""
        counts = torch.arange(seen_before + 1, seen_before + len(examples) + 1, dtype=torch.float64)
        draws = (torch.rand(len(examples), generator=generator, dtype=torch.float64) * counts).long().tolist()
        for example, j in zip(examples, draws, strict=True):
            if len(slots) < capacity:
                slots.append(len(self.examples))
                self._append(task, example, math.nan)
            elif j < capacity:
                k = slots[j]
                self.examples[k], self.tasks[k], self.scores[k] = _host_copy(example), task, math.nan

    def reservoir_slots(self, task: int, n: int, generator: torch.Generator) -> list[int]:
        """Algorithm R (global, ``per_task`` off) for ``n`` more examples of ``task``, decided before they are
        stored: the slot each takes (``len(self)`` and on while the buffer fills, a slot ``j ~ U{0..k-1}`` for the
        k-th example seen once it is full, -1 for none; a later example may take an earlier one's slot). The
        counters advance; the caller then ``put``s the examples in order. The draws are ``_reservoir``'s."""
        before = self.seen_total
        self.seen[task] = self.seen.get(task, 0) + n
        self.seen_total += n
        counts = torch.arange(before + 1, before + n + 1, dtype=torch.float64)
        draws = (torch.rand(n, generator=generator, dtype=torch.float64) * counts).long().tolist()
        slots, filled = [], len(self)
        for j in draws:
            if filled < self.size:
                slots.append(filled)
                filled += 1
            else:
                slots.append(j if j < self.size else -1)
        return slots

    def put(self, slot: int, task: int, example: Encoded) -> None:
        """Store ``example`` in ``slot`` (a slot from ``reservoir_slots``; ``len(self)`` appends)."""
        if slot == len(self.examples):
            self._append(task, example, math.nan)
        else:
            self.examples[slot], self.tasks[slot], self.scores[slot] = _host_copy(example), task, math.nan

    def _shrink(self, task: int, quota: int, generator: torch.Generator) -> None:
        mine = [i for i, t in enumerate(self.tasks) if t == task]
        if len(mine) <= quota:
            return
        if self.sampling == "hardest":
            keep_order = sorted(mine, key=lambda i: -self.scores[i])
        else:
            keep_order = [mine[i] for i in torch.randperm(len(mine), generator=generator).tolist()]
        drop = set(keep_order[quota:])
        keep = [i for i in range(len(self.examples)) if i not in drop]
        self.examples = [self.examples[i] for i in keep]
        self.tasks = [self.tasks[i] for i in keep]
        self.scores = [self.scores[i] for i in keep]

    def sample(self, n: int, generator: torch.Generator) -> list[Encoded]:
        """``n`` examples drawn uniformly: without replacement, or with replacement when ``n > len(self)``."""
        if n <= 0 or not self.examples:
            return []
        if n <= len(self.examples):
            idx = torch.randperm(len(self.examples), generator=generator)[:n]
        else:
            idx = torch.randint(len(self.examples), (n,), generator=generator)
        return [self.examples[i] for i in idx.tolist()]

    def counts(self) -> dict[int, int]:
        return {t: self.tasks.count(t) for t in sorted(set(self.tasks))}

    def tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)

    def state_dict(self) -> dict[str, Any]:
        return {"examples": [_host_copy(e) for e in self.examples], "tasks": list(self.tasks),
                "scores": list(self.scores), "seen": dict(self.seen), "seen_total": self.seen_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.examples = [_host_copy(e) for e in state["examples"]]
        self.tasks, self.scores = list(state["tasks"]), list(state["scores"])
        self.seen = {int(t): int(n) for t, n in state["seen"].items()}
        self.seen_total = int(state["seen_total"])


TOKEN_BYTES = 16  # a buffered example's token: its id and its label (the encoded lists, as int64 would hold them)


def buffer_bytes(cfg: Any, size: ModelSize) -> int:
    """A full buffer of ``cfg.buffer_size`` examples of at most ``size.max_length`` tokens (the memory plan)."""
    return cfg.buffer_size * size.max_length * TOKEN_BYTES


class BufferGradients(Strategy):
    """What A-GEM, GEM and DER share: a buffer filled in ``after_task`` (DER's default fills it at every step
    instead), seeded per-step draws from it, and the chunk size of reference gradients (the step's largest
    micro-batch, seen in ``loss``)."""

    supports = Supports()  # what a strategy built on it adds to its own facts (nothing refused)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.buffer = ReplayBuffer(cfg.buffer_size, cfg.sampling, cfg.per_task)
        self.rng: torch.Generator | None = None
        self.rng_task = -1  # task whose GRADIENT_DRAW_SALT generator ``rng`` is
        self.chunk = 1  # the largest micro-batch of the current step (reference gradients go no bigger)
        self.steps = 0  # optimizer steps with a non-empty buffer, over the run
        self.changed = 0  # ... whose gradient the strategy changed (projected)

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        return StateNeeds(local_bytes=buffer_bytes(self.cfg, size))

    def loss(self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        self.chunk = len(ctx.micro.examples) if ctx.micro is not None else len(batch["input_ids"])
        return loss

    def draw(self, ctx: Context, pool: list[int], n: int) -> list[Encoded]:
        """``n`` buffer examples of the slots ``pool`` (uniform, without replacement when they fit)."""
        if self.rng is None or self.rng_task != ctx.task_index:
            self.rng, self.rng_task = ctx.generator(GRADIENT_DRAW_SALT), ctx.task_index
        idx = (torch.randperm(len(pool), generator=self.rng)[:n] if n <= len(pool)
               else torch.randint(len(pool), (n,), generator=self.rng))
        return [self.buffer.examples[pool[i]] for i in idx.tolist()]

    def fill(self, ctx: Context, examples: list[Encoded]) -> None:
        """Offer the finished task's ``examples`` to the buffer (its ``sampling`` rule)."""
        def score(offered: list[Encoded]) -> torch.Tensor:
            return example_losses(ctx, offered, batch_size=max(ctx.batch_size, 1))

        self.buffer.add_task(ctx.task_index, examples, ctx.generator(GRADIENT_FILL_SALT), score)
        ctx.log(buffer_examples=len(self.buffer))

    def after_task(self, ctx: Context) -> None:
        self.fill(ctx, ctx.train_sets[ctx.task_index])

    def accounting(self) -> dict[str, Any]:
        return {"buffer_examples": len(self.buffer), "buffer_tokens": self.buffer.tokens(),
                "buffer_per_task": self.buffer.counts()}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "rng_task": self.rng_task, "changed": self.changed,
                "steps": self.steps, "rng_state": None if self.rng is None else self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.rng_task, self.rng = int(state["rng_task"]), None
        self.changed, self.steps = int(state["changed"]), int(state["steps"])
        if state["rng_state"] is not None:
            self.rng = torch.Generator()
            self.rng.set_state(state["rng_state"])
