"""Model merging as continual learning: task arithmetic, TIES, DARE, MagMax and averaging of task vectors
``tau_k = theta_k - theta_0`` (``theta_0``: the weights before the first task; ``theta_k``: the weights
fine-tuned on task k). The mathematics is in ``merging.py``; this file keeps the state and applies it.

After task t the model becomes ``theta_0 + merge(tau_1..tau_t)``: every row of the accuracy matrix scores the
merge of the task vectors so far, without task identity. ``when`` says where the next task starts:

- ``end``: from ``theta_t``, the un-merged fine-tuned weights (sequential fine-tuning, MagMax's setting; the
  merge only serves evaluation, and the final model is the merge of all task vectors).
- ``sequential``: from the merged model (each task vector then contains the earlier merges).

``over: full`` merges the full fine-tunes (every trainable parameter); ``over: lora`` trains one LoRA adapter
per task over the frozen base, and a task vector is a combination of adapters: with ``end`` task k trains over
adapters ``0..k-1`` active at weight 1, with ``sequential`` at their merged weights. Only the linear merges
(``task_arithmetic``, ``average``) are exact on adapters (peft's ``cat`` combination); they are applied as
per-adapter scales (peft's ``LoraLayer.set_scale``), so the merge costs no new adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_choice, check_fraction, check_positive
from cl_runner.core.dist import all_reduce_sum, world
from cl_runner.core.lazy import no_grad
from cl_runner.strategies.adapters import Adapters, SharedLoRAConfig, adapter_name
from cl_runner.strategies.anchor import DTYPES
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, Strategy, trainable_parameters
from cl_runner.strategies.common import local, shard_like, sharded_view
from cl_runner.strategies.compose import Composite
from cl_runner.strategies.lora import activate
from cl_runner.strategies.memory import merge_state_bytes, refuse_state_unless_fits
from cl_runner.strategies.merge_methods import (
    COMBINE,
    LINEAR,
    METHODS,
    dare_drop,
    empty_state,
    fold,
    kth_largest_magnitude,
    linear_coefficients,
    merged_update,
    state_size,
    trim,
)
from cl_runner.strategies.support import Supports, combined

DARE_SALT = 61  # ctx.generator salt of DARE's drop draws (task k's vector: task=k)


@dataclass
class MergeConfig(SharedLoRAConfig):
    name: str = "merge"
    method: str = "magmax"  # task_arithmetic | ties | dare | magmax | average
    over: str = "full"  # full (every trainable parameter) | lora (one adapter per task; linear methods only)
    when: str = "end"  # end (train from the fine-tuned weights) | sequential (train from the merged model)
    lam: float = 1.0  # lambda, the scale of the merged task vector (average: must stay 1.0)
    density: float = 0.2  # ties: fraction of each task vector kept (top by magnitude), in (0, 1]
    drop: float = 0.5  # dare: probability p of dropping an entry, in [0, 1)
    combine: str = "task_arithmetic"  # dare: task_arithmetic | ties (sign election and disjoint mean)
    state_dtype: str = "float32"  # dtype of theta_0 and the merge state: float32 | bfloat16

    def errors(self, key: str) -> list[str]:
        errs = super().errors(key)
        check_choice(errs, f"{key}.method", self.method, METHODS)
        check_choice(errs, f"{key}.over", self.over, ("full", "lora"))
        check_choice(errs, f"{key}.when", self.when, ("end", "sequential"))
        check_choice(errs, f"{key}.combine", self.combine, COMBINE)
        check_choice(errs, f"{key}.state_dtype", self.state_dtype, DTYPES)
        check_positive(errs, f"{key}.lam", self.lam)
        if self.density is None or not 0 < self.density <= 1:
            errs.append(f"{key}.density: expected a value in (0, 1], got {self.density!r}")
        check_fraction(errs, f"{key}.drop", self.drop, closed_right=False)
        if self.method == "average" and self.lam != 1.0:
            errs.append(f"{key}.lam: average is the mean of the fine-tuned weights and takes no lambda; "
                        f"use method=task_arithmetic to scale, got lam={self.lam!r}")
        if self.over == "lora" and self.method not in LINEAR:
            errs.append(f"{key}.method: with over=lora expected one of {', '.join(LINEAR)} (exact weighted sums of "
                        f"adapters), got {self.method!r}: it acts entry by entry on the full update B A, which is not "
                        "low rank (peft's *_svd combinations truncate it); use over=full")
        return errs


class FullMerge(Strategy):
    """Merging of full fine-tunes: keeps ``theta_0`` and the method's running state (``merging.fold``), each
    as this rank's shard of its parameter under FSDP (as ``anchor.py`` does), plus, for ``when=end``, the
    latest task vector (to put the fine-tuned weights back before the next task)."""

    name = "merge"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.dtype = getattr(torch, cfg.state_dtype)
        self.names: list[str] | None = None  # the merged parameters (trainable at the first task)
        self.theta0: list[torch.Tensor] | None = None
        self.acc: list[list[torch.Tensor]] = []  # per parameter: the running state
        self.last: list[torch.Tensor] | None = None  # when=end: tau of the latest task
        self.tasks = 0  # task vectors merged
        self.coefficients: list[list[float]] = []  # row t: the coefficient of each tau_k in merge t
        self.numel = 0
        self._params: list[torch.Tensor] = []

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """theta_0, the method's running state and the latest task vector, in ``state_dtype``."""
        return StateNeeds(sharded_bytes=3 * self.dtype.itemsize * size.parameters)

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        numel = sum(p.numel() for _, p in trainable_parameters(ctx.model))
        refuse_state_unless_fits(ctx.model, ctx.device, merge_state_bytes(numel, self.dtype.itemsize),
                                 "merge's base weights, running merge and latest task vector", "strategy.state_dtype",
                                 "set strategy.state_dtype=bfloat16 or merge LoRA adapters (strategy.over=lora)")

    def params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        named = dict(model.named_parameters())
        self._params = [named[n] for n in self.names or []]  # kept for state_dict's sharded views
        return self._params

    @no_grad
    def before_task(self, ctx: Context) -> None:
        if self.theta0 is None:
            self.names = [n for n, _ in trainable_parameters(ctx.model)]
            params = self.params(ctx.model)
            self.theta0 = [local(p.detach()).to(self.dtype, copy=True) for p in params]
            self.numel = sum(p.numel() for p in params)
        elif self.cfg.when == "end" and self.last is not None:  # continue from the fine-tuned weights
            self._place(ctx.model)
            for p, t0, tau in zip(self.params(ctx.model), self.theta0, self.last, strict=True):
                local(p).copy_(t0.float() + tau.float())

    @no_grad
    def after_task(self, ctx: Context) -> None:
        """Fold task t's vector into the state and put ``theta_0 + merge`` into the model."""
        self._place(ctx.model)
        params, cfg = self.params(ctx.model), self.cfg
        if cfg.when == "end":
            self.last = [self.tau(p, i).to(self.dtype) for i, p in enumerate(params)]
        self.fold_task(ctx, params)
        self.tasks += 1
        scale = 1.0 / self.tasks if cfg.method == "average" else cfg.lam
        self.coefficients.append([round(scale, 6)] * self.tasks)
        for i, p in enumerate(params):
            update = merged_update(self.acc[i], cfg.method, self.tasks, cfg.lam, cfg.combine)
            local(p).copy_(self.theta0[i].float() + update)

    def fold_task(self, ctx: Context, params: list[torch.Tensor]) -> None:
        """The current task vector, trimmed (TIES) or dropped (DARE), folded into the state tensor by tensor."""
        cfg = self.cfg
        if not self.acc:
            self.acc = [empty_state(t, cfg.method, cfg.combine, self.dtype) for t in self.theta0]
        threshold = self.threshold(params) if cfg.method == "ties" else None
        generator = ctx.generator(DARE_SALT) if cfg.method == "dare" else None
        for i, p in enumerate(params):
            tau = self.tau(p, i)
            if threshold is not None:
                tau = trim(tau, threshold)
            elif generator is not None:  # the whole tensor's draws, then this rank's shard of them
                tau = dare_drop(tau, shard_like(torch.rand(p.shape, generator=generator), p), cfg.drop)
            self.acc[i] = fold(self.acc[i], tau, cfg.method, cfg.combine)

    def tau(self, p: torch.Tensor, i: int) -> torch.Tensor:
        return local(p.detach()).float() - self.theta0[i].float()

    def threshold(self, params: list[torch.Tensor]) -> float:
        """TIES: the magnitude of this task vector's ``density`` top fraction over all merged parameters (every
        rank's shards together under FSDP: a global top-k, the same at any process count)."""
        k = int(self.cfg.density * self.numel)
        reduce = all_reduce_sum if world().sharded else (lambda t: t)
        return kth_largest_magnitude(lambda: (self.tau(p, i) for i, p in enumerate(params)), k, reduce)

    def _place(self, model: torch.nn.Module) -> None:
        """The state as this rank's shards on the parameters' device (a checkpoint may hold it whole, on the
        CPU, or as DTensors)."""
        params = self.params(model)
        self.theta0 = [shard_like(t, p) for t, p in zip(self.theta0, params, strict=True)]
        self.acc = [[shard_like(t, p) for t in state] for state, p in zip(self.acc, params, strict=False)]
        if self.last is not None:
            self.last = [shard_like(t, p) for t, p in zip(self.last, params, strict=True)]

    def accounting(self) -> dict[str, Any]:
        """Sizes of the whole state (every rank's shards together) and the merge coefficients."""
        copies = (1 + state_size(self.cfg.method, self.cfg.combine) + (self.cfg.when == "end")) if self.tasks else 0
        return {"merge_state_bytes": self.numel * copies * self.dtype.itemsize, "merge_parameters": self.numel,
                "merge_lambda": self.cfg.lam, "merge_coefficients": self.coefficients}

    def state_dict(self) -> dict[str, Any]:
        def view(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            if not (world().sharded and self._params):
                return list(ts)
            return [sharded_view(t, p) for t, p in zip(ts, self._params, strict=True)]

        return {"names": self.names, "theta0": None if self.theta0 is None else view(self.theta0),
                "acc": [view(list(col)) for col in zip(*self.acc, strict=True)] if self.acc else [],
                "last": None if self.last is None else view(self.last), "tasks": self.tasks,
                "coefficients": self.coefficients, "numel": self.numel}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names, self.theta0, self.last = state["names"], state["theta0"], state["last"]
        self.acc = [list(row) for row in zip(*state["acc"], strict=True)] if state["acc"] else []
        self.tasks, self.numel = int(state["tasks"]), int(state["numel"])
        self.coefficients = [list(row) for row in state["coefficients"]]
        self._params = []


class LoraMerge(Adapters):
    """Merging of per-task LoRA adapters. Every task vector is kept as its coefficients over the adapters
    (``taus[k][j]``: the weight of adapter j's update ``B_j A_j alpha/r`` in ``tau_k``); a model is a set of
    adapter weights, applied with peft's ``set_scale`` with every adapter so far active. Task k trains adapter k
    at weight 1 over the earlier adapters at the weights of its start (``end``: 1, the fine-tuned chain;
    ``sequential``: the merge), so ``tau_k`` = those weights + adapter k; the merge is
    ``merging.linear_coefficients``. Adapters are made as ``adapters`` makes them (before sharding under FSDP)."""

    name = "merge"
    supports = Supports()  # no O-LoRA penalty (``loss`` adds none): none of adapters' facts

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.taus: list[list[float]] = []
        self.merged: list[float] = []  # the adapter weights of the merge of the task vectors so far

    def training(self, task: int) -> list[str]:
        return [adapter_name(t) for t in range(task + 1)]

    def start(self, task: int) -> list[float]:
        """Adapter weights task ``task`` trains with (its own adapter last, at 1)."""
        before = self.merged if self.cfg.when == "sequential" else [1.0] * task
        return [*before[:task], 1.0]

    def before_task(self, ctx: Context) -> None:
        super().before_task(ctx)
        set_weights(ctx.model, self.start(ctx.task_index))

    def after_task(self, ctx: Context) -> None:
        super().after_task(ctx)
        self.taus.append(self.start(ctx.task_index))
        self.merged = linear_coefficients(self.cfg.method, self.cfg.lam, self.taus)
        set_weights(ctx.model, self.merged)

    def before_eval(self, ctx: Context, task_index: int) -> None:
        activate(ctx.model, self.names())  # the merge (or, mid-task, the model being trained): no task identity

    def loss(self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_resume(self, ctx: Context) -> None:
        super().on_resume(ctx)
        if self.created:
            finished = len(self.taus) == self.created
            set_weights(ctx.model, self.merged if finished else self.start(self.created - 1))

    def accounting(self) -> dict[str, Any]:
        costs = super().accounting()  # the adapters are the state: extra_bytes
        return {**costs, "merge_state_bytes": costs.get("extra_bytes", 0), "merge_lambda": self.cfg.lam,
                "merge_coefficients": self.merged}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "taus": self.taus, "merged": self.merged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.taus, self.merged = [list(t) for t in state["taus"]], list(state["merged"])


def set_weights(model: torch.nn.Module, weights: list[float]) -> None:
    """Adapter ``task{j}`` scaled by ``weights[j]`` (peft's ``set_scale``: times its alpha / rank)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for j, weight in enumerate(weights):
                module.set_scale(adapter_name(j), weight)


class Merge(Composite):
    """``strategy=merge``: ``FullMerge`` (``over=full``) or ``LoraMerge`` (``over=lora``)."""

    name = "merge"
    Config = MergeConfig
    supports = combined(FullMerge, LoraMerge)  # over=full or over=lora

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, [LoraMerge(cfg) if cfg.over == "lora" else FullMerge(cfg)])
