"""Gradient projection against stored examples: A-GEM (Chaudhry et al. 2019) and GEM (Lopez-Paz & Ranzato 2017).

Both keep a replay buffer (``buffer.py``, filled in ``after_task``) but never train on it: in ``after_backward``
they compute reference gradients on buffer examples and change the step's gradient ``g`` (complete, unscaled,
before clipping) so that, to first order, the step does not increase the loss on the buffer.

- A-GEM: one reference gradient ``r`` per optimizer step, on ``ref_batch_size`` examples drawn uniformly from the
  whole buffer, every task's examples together (as the paper's reference batch, sampled at random from the whole
  episodic memory, and mammoth's ``agem.py``); when ``g.r < 0``, ``g <- g - (g.r / r.r) r`` (``agem_project``).
  One extra forward and backward per step.
- GEM: one reference gradient ``g_k`` per earlier task k, over that task's whole episodic memory (its buffer
  examples; ``reference: memory``, the paper's and mammoth's ``gem.py``), or over ``ref_batch_size`` of them drawn
  anew every step (``reference: sampled``, our cheaper, stochastic constraint). When some ``g.g_k < 0``,
  ``g <- g + G^T v`` with ``v`` the solution of GEM's dual quadratic program
  ``min_{v >= margin} 1/2 v^T (G G^T) v + (G g)^T v`` (``gem_dual``). ``t - 1`` reference gradients per step on
  task t (each a forward and backward over its examples, in chunks), and ``t - 1`` gradient copies in memory:
  refused above ``max_tasks`` tasks.

Reference gradients (``examples_gradient``) are gradients of the mean target-token NLL of the drawn examples, in
the model's current mode, under ``ctx.autocast()``, in chunks of at most the step's largest micro-batch (the
chunks are weighted by their share of target tokens, so the result does not depend on ``train.grad_accum`` but
for float rounding). The step's gradients are set aside while they are computed and put back. Several processes:
every rank computes its slice of the examples (``dist.shard_bounds``) with the gradient scaled as the loop scales
its own, and the slices are added across ranks: under DDP by an all-reduce of the reference gradient (the bare
module's backward does not reduce), under FSDP by FSDP's own reduce-scatter (each rank then holds its shard).
Every dot product is summed across shards, so every rank takes the same decision and the same projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cl_runner.core.checks import check_choice, check_positive
from cl_runner.core.dist import all_reduce_sum, world
from cl_runner.core.errors import ConfigError
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import Encoded, target_count, token_nll
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, trainable_parameters
from cl_runner.strategies.buffer import BufferConfig, BufferGradients
from cl_runner.strategies.common import local
from cl_runner.strategies.memory import gradient_memory_bytes, numel_and_itemsize, refuse_state_unless_fits

RIDGE = 1e-3  # added to the diagonal of G G^T (as GEM's reference code does): a unique dual solution
SolveInfo = dict[str, float]

# ------------------------------------------------------------------------------------------ the mathematics


def agem_project(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A-GEM's projection of one flat gradient: ``g - (g.r / r.r) r`` when ``g.r < 0``, else ``g``."""
    dot = torch.dot(g, r)
    return g - (dot / torch.dot(r, r)) * r if dot < 0 else g


def gem_dual(gram: torch.Tensor, dots: torch.Tensor, margin: float = 0.0, tol: float = 1e-12,
             max_sweeps: int = 10_000, info: SolveInfo | None = None) -> torch.Tensor:
    """``v = argmin_{v >= margin} 1/2 v^T A v + b^T v`` with ``A = gram + RIDGE I`` (``gram = G G^T``, t x t) and
    ``b = dots = G g``, by Hildreth's method: cyclic exact minimisation over one coordinate at a time, clipped to
    the bound, ``v_k <- max(margin, v_k - (A v + b)_k / A_kk)``. A is positive definite, so the sweeps converge to
    the unique minimiser; they stop when no coordinate moves by more than ``tol`` times the largest ``|v|`` (or 1).
    Float64 on the host: t is the number of earlier tasks. ``info``, when given, receives ``sweeps`` (how many ran)
    and ``moved`` (the last sweep's largest coordinate change)."""
    a = gram.double().cpu() + RIDGE * torch.eye(len(dots), dtype=torch.float64)
    b, v = dots.double().cpu(), torch.full((len(dots),), float(margin), dtype=torch.float64)
    sweeps, moved = 0, 0.0
    while sweeps < max_sweeps:
        sweeps, moved = sweeps + 1, 0.0
        for k in range(len(v)):
            new = max(float(margin), float(v[k] - (a[k] @ v + b[k]) / a[k, k]))
            moved, v[k] = max(moved, abs(new - float(v[k]))), new
        if moved <= tol * max(1.0, float(v.abs().max())):
            break
    if info is not None:
        info.update(sweeps=sweeps, moved=moved)
    return v


def dot_all(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i <a_i, b_i>`` over tensor lists (fp32, 0-dim), summed over ranks' shards under FSDP."""
    total = torch.stack([torch.dot(x.flatten().float(), y.flatten().float()) for x, y in zip(a, b, strict=True)]).sum()
    return all_reduce_sum(total) if world().sharded else total


# ------------------------------------------------------------------------------------ reference gradients


def step_gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The step's gradient as this rank's local tensors (a missing one, for an unused parameter, made zero)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [local(p.grad) for p in params]


def rank_chunks(examples: Sequence[Encoded], chunk: int) -> list[list[Encoded]]:
    """This rank's slice of ``examples`` cut into the same number of chunks on every rank (FSDP: every rank must
    make the same forward calls); a chunk may be empty where a rank's slice is shorter."""
    size, rank = world().size, world().rank
    base, extra = divmod(len(examples), size)
    start = rank * base + min(rank, extra)
    mine = list(examples[start : start + base + (rank < extra)])
    count = max(1, math.ceil((base + (extra > 0)) / chunk))
    edges = [len(mine) * i // count for i in range(count + 1)]
    return [mine[edges[i] : edges[i + 1]] for i in range(count)]


def nll_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor], examples: list[Encoded]) -> torch.Tensor:
    """The summed target-token NLL of a collated batch (the default term of ``examples_gradient``)."""
    return token_nll(logits, batch["labels"]).sum()


if TYPE_CHECKING:  # an alias read at import would load torch (cl_runner/core/lazy.py)
    Term = Callable[[torch.Tensor, dict[str, torch.Tensor], list[Encoded]], torch.Tensor]


def examples_gradient(ctx: Context, examples: Sequence[Encoded], chunk: int,
                      term: Term = nll_sum) -> list[torch.Tensor]:
    """The gradient, w.r.t. the trainable parameters, of ``term`` (a sum over the target positions of a batch)
    divided by the examples' number of target positions: this rank's local tensors, the same result on every rank
    (module docstring). The parameters' ``.grad`` are left as they were."""
    params = [p for _, p in trainable_parameters(ctx.model)]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    total, w = max(sum(target_count(e) for e in examples), 1), world()
    scale = (w.size if w.sharded else 1) / total  # FSDP's reduce-scatter averages over ranks: undo it
    for part in rank_chunks(examples, max(chunk, 1)):
        rows = part or list(examples[:1])  # an empty chunk still joins FSDP's collectives
        batch = ctx.kind.model_batch(ctx.collate(rows), rows)  # as the model's kind reads it
        with ctx.autocast():
            logits = ctx.model(**ctx.kind.model_inputs(batch)).logits
            summed = term(logits, batch, rows)
        (summed * (scale if part else 0.0)).backward()
    grads = step_gradients(params)
    for p, g in zip(params, saved, strict=True):
        p.grad = g
    if w.distributed and not w.sharded:  # DDP: the bare module's backward reduced nothing
        for g in grads:
            all_reduce_sum(g)
    return grads


# ------------------------------------------------------------------------------------------- strategies


@dataclass
class AGEMConfig(BufferConfig):
    name: str = "agem"
    ref_batch_size: int = 16  # buffer examples per reference gradient (GEM: per earlier task), every step

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        self.buffer_errors(errs, key)
        check_positive(errs, f"{key}.ref_batch_size", self.ref_batch_size)
        return errs


class AGEM(BufferGradients):
    """A-GEM: one reference gradient per step on a uniform buffer draw; ``g`` projected when ``g.r < 0``."""

    name = "agem"
    Config = AGEMConfig
    supports = BufferGradients.supports

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        return super().memory_needs(size) + StateNeeds(sharded_bytes=4 * size.parameters)  # the reference gradient

    @no_grad
    def after_backward(self, ctx: Context) -> None:
        if len(self.buffer) == 0:
            return
        examples = self.draw(ctx, list(range(len(self.buffer))), self.cfg.ref_batch_size)
        with torch.enable_grad():
            ref = examples_gradient(ctx, examples, self.chunk)
        grads = step_gradients([p for _, p in trainable_parameters(ctx.model)])
        dot, ref_sq = dot_all(grads, ref), dot_all(ref, ref)
        coef = dot.clamp(max=0) / ref_sq.clamp_min(torch.finfo(torch.float32).tiny)  # 0 unless g.r < 0
        torch._foreach_sub_(grads, torch._foreach_mul(ref, coef.to(grads[0].dtype)))
        projected = bool(dot < 0)  # one host read per step, for the count in the accounting
        self.steps, self.changed = self.steps + 1, self.changed + projected
        ctx.log(agem_projected=float(projected))

    def accounting(self) -> dict[str, Any]:
        return {**super().accounting(), "agem_projected_steps": self.changed, "agem_steps_with_buffer": self.steps,
                "agem_extra_backward_per_step": 1}


REFERENCES = ("memory", "sampled")


@dataclass
class GEMConfig(AGEMConfig):
    name: str = "gem"
    per_task: bool = True  # GEM keeps an equal memory per task
    reference: str = "memory"  # memory: each earlier task's whole memory | sampled: ref_batch_size of it per step
    margin: float = 0.5  # GEM's memory strength gamma: the dual variables are at least this once projecting
    max_tasks: int = 20  # refused above: (tasks - 1) gradient copies and backward passes per step

    def errors(self, key: str) -> list[str]:
        errs = super().errors(key)
        check_choice(errs, f"{key}.reference", self.reference, REFERENCES)
        check_positive(errs, f"{key}.margin", self.margin, allow_zero=True)
        check_positive(errs, f"{key}.max_tasks", self.max_tasks)
        return errs


class GEM(BufferGradients):
    """GEM: one reference gradient per earlier task; when one of them disagrees with ``g``, ``g`` is replaced by
    the closest gradient that agrees with all (the dual QP, ``gem_dual``)."""

    name = "gem"
    Config = GEMConfig
    supports = BufferGradients.supports

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.gradient_bytes = 0  # one copy of the trainable parameters' gradient (all ranks' shards together)

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """The buffer, one fp32 gradient per earlier task and the step's own."""
        copies = min(size.tasks, self.cfg.max_tasks)
        return super().memory_needs(size) + StateNeeds(sharded_bytes=4 * size.parameters * copies)

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        tasks = len(ctx.task_names)
        if tasks > self.cfg.max_tasks:
            params = sum(p.numel() for _, p in trainable_parameters(ctx.model))
            raise ConfigError(f"strategy.max_tasks: GEM keeps one gradient per earlier task ({tasks - 1} x "
                              f"{params:,} parameters) and runs as many extra backward passes per step; this "
                              f"sequence has {tasks} tasks, above max_tasks={self.cfg.max_tasks} (raise it or use "
                              "strategy=agem)")
        numel, itemsize = numel_and_itemsize(p for _, p in trainable_parameters(ctx.model))
        refuse_state_unless_fits(ctx.model, ctx.device, gradient_memory_bytes(numel, tasks, itemsize),
                                 f"GEM's {tasks - 1} reference gradients", "strategy",
                                 "use strategy=agem (one reference gradient) or a shorter sequence")

    def after_task(self, ctx: Context) -> None:
        super().after_task(ctx)
        self.gradient_bytes = sum(p.numel() * p.element_size() for _, p in trainable_parameters(ctx.model))

    @no_grad
    def after_backward(self, ctx: Context) -> None:
        tasks = sorted(set(self.buffer.tasks))
        if not tasks:
            return
        refs = []
        for t in tasks:
            pool = [i for i, k in enumerate(self.buffer.tasks) if k == t]
            examples = (self.draw(ctx, pool, self.cfg.ref_batch_size) if self.cfg.reference == "sampled"
                        else [self.buffer.examples[i] for i in pool])  # chunked by examples_gradient
            with torch.enable_grad():
                refs.append(examples_gradient(ctx, examples, self.chunk))
        grads = step_gradients([p for _, p in trainable_parameters(ctx.model)])
        dots = torch.stack([dot_all(grads, r) for r in refs])
        projected = bool((dots < 0).any())  # one host read per step: whether to project
        if projected:
            gram = torch.stack([torch.stack([dot_all(a, b) for b in refs]) for a in refs])
            v = gem_dual(gram, dots, self.cfg.margin)
            for k, r in enumerate(refs):
                torch._foreach_add_(grads, r, alpha=float(v[k]))
        self.steps, self.changed = self.steps + 1, self.changed + projected
        ctx.log(gem_projected=float(projected))

    def accounting(self) -> dict[str, Any]:
        """Costs on the last task (t - 1 earlier tasks): extra backward passes per step and gradient copies held."""
        earlier = max(len(self.buffer.counts()) - 1, 0)
        return {**super().accounting(), "gem_projected_steps": self.changed, "gem_steps_with_buffer": self.steps,
                "gem_extra_backward_per_step": earlier, "gem_reference_gradient_bytes": earlier * self.gradient_bytes}
