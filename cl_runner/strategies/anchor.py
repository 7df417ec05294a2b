"""Quadratic anchor penalties ``lam/2 * sum_k sum_i F_k,i (theta_i - theta_k,i)^2`` (EWC; L2 has F = 1).

Several per-task quadratics are pre-summed into one: ``sum_k F_k (x - m_k)^2 = F (x - m)^2 + C`` with
``F = sum_k F_k``, ``m = sum_k F_k m_k / F`` (any value where F = 0) and a constant C >= 0, so the state
is two copies of the penalised parameters (F and m; L2 keeps only m and a scalar F) whatever the number of
tasks.
Merging two: ``a (x - p)^2 + b (x - q)^2 = (a + b)(x - (a p + b q)/(a + b))^2 + ab/(a + b) (p - q)^2``.
The gradient ``lam * F * (theta - m)`` is added to ``.grad`` with fused ``torch._foreach_*`` ops after the
backward pass, outside autograd: no graph, no extra activation memory.

Several processes. Under DDP every rank holds the whole model and the averaged gradient, so every rank keeps the
whole state and adds the same penalty gradient. Under FSDP the state is sharded like the parameters: F and m are
this rank's shards (``common.local``: the shard of each parameter), the penalty gradient is added to the local
shard of the sharded gradient, and only the scalars (the penalty value, the merge constant) are summed across
ranks; no rank ever holds a full copy. ``state_dict`` gives the shards as DTensors laid out like their
parameters (a sharded checkpoint reshards them); ``load_state_dict`` takes either form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_choice
from cl_runner.core.dist import all_reduce_sum, world
from cl_runner.core.errors import ConfigError
from cl_runner.core.lazy import no_grad
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, Strategy, StrategyConfig, trainable_parameters
from cl_runner.strategies.common import local, selected_parameters, shard_like, sharded_view
from cl_runner.strategies.memory import (
    anchor_state_bytes,
    estimation_bytes,
    numel_and_itemsize,
    refuse_state_unless_fits,
)

LOG_EVERY = 10  # optimizer steps between penalty values logged (each is a pass over the penalised parameters)
DTYPES = ("float32", "bfloat16")  # state_dtype: names of torch dtypes


@dataclass
class AnchorConfig(StrategyConfig):
    """Options of every quadratic anchor penalty (EWC, L2, SI, MAS)."""

    penalised_params: str | None = None  # regex (re.search) on parameter names to penalise; null = all trainable
    state_dtype: str = "float32"  # dtype of the stored importance (Fisher, Omega) and anchor: float32 | bfloat16

    def anchor_errors(self, errs: list[str], key: str) -> None:
        check_choice(errs, f"{key}.state_dtype", self.state_dtype, tuple(DTYPES))
        if self.penalised_params is not None:
            try:
                re.compile(self.penalised_params)
            except re.error as exc:
                errs.append(f"{key}.penalised_params: not a valid regular expression ({exc})")


def merge_quadratics(f1: torch.Tensor, m1: torch.Tensor, f2: torch.Tensor, m2: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``f1 (x - m1)^2 + f2 (x - m2)^2 = f (x - m)^2 + c``: returns f, m and the summed constant c (fp32)."""
    f1, m1, f2, m2 = f1.float(), m1.float(), f2.float(), m2.float()
    f = f1 + f2
    safe = torch.where(f > 0, f, torch.ones_like(f))
    m = torch.where(f > 0, (f1 * m1 + f2 * m2) / safe, m2)
    c = (f1 * f2 / safe * (m1 - m2).square()).sum()
    return f, m, c


@no_grad
def add_penalty_grad_(params: list[torch.Tensor], anchor: list[torch.Tensor],
                      fisher: list[torch.Tensor] | None, scale: float) -> None:
    """``p.grad += scale * F * (p - anchor)`` for every p (F = 1 when ``fisher`` is None); under FSDP on this
    rank's shard of ``p`` and of its gradient (``anchor`` and ``fisher`` are the matching shards).

    Missing grads (a parameter unused by this step's batches) are created as zeros first.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    diff = torch._foreach_sub([local(p.detach()) for p in params], anchor)
    if fisher is not None:
        torch._foreach_mul_(diff, fisher)
    torch._foreach_add_([local(p.grad) for p in params], diff, alpha=scale)


@no_grad
def quadratic_sum(params: list[torch.Tensor], anchor: list[torch.Tensor],
                  fisher: list[torch.Tensor] | None) -> torch.Tensor:
    """``sum F (p - anchor)^2`` over all tensors, as a 0-dim fp32 tensor (no host sync but, under FSDP, the sum of
    the ranks' shards: a collective every rank makes)."""
    diff = torch._foreach_sub([local(p.detach()).float() for p in params], anchor)
    torch._foreach_mul_(diff, diff)
    if fisher is not None:
        torch._foreach_mul_(diff, fisher)
    total = torch.stack(torch._foreach_norm(diff, 1)).sum()  # the terms are >= 0: L1 norm = sum
    return all_reduce_sum(total) if world().sharded else total


class AnchorPenalty(Strategy):
    """Shared by EWC and L2: keeps the merged quadratic and applies its gradient in ``after_backward``.

    Subclasses set ``lam`` and implement ``importance`` (the finished task's F, or None for F = 1).
    With ``online`` the merge is online EWC's instead: ``F = gamma * F_old + F_new`` and ``m = theta_new``.
    """

    online = False
    gamma = 1.0
    copies = 2  # kept per penalised parameter: the anchor and its importance (L2: the anchor only)
    batch_option: str | None = None  # the option of the importance pass's batch (EWC, MAS); None: no such pass
    extra_copies = 0  # further fp32 copies of the penalised parameters held while training (SI)

    def __init__(self, cfg: Any, lam: float) -> None:
        super().__init__(cfg)
        self.lam, self.dtype = lam, getattr(torch, cfg.state_dtype)
        self.names: list[str] | None = None  # the penalised parameters, fixed at the first after_task
        self.anchor: list[torch.Tensor] | None = None  # m
        self.fisher: list[torch.Tensor] | None = None  # F (None: a scalar F = self.weight everywhere)
        self.weight = 0.0  # scalar multiplying F (L2: the number of tasks merged; EWC: 1)
        self.const = 0.0  # C / weight (the constant of the merged quadratic)
        self.numel = 0  # elements of the penalised parameters (all ranks' shards together)
        self._params: tuple[int, list[torch.Tensor]] | None = None  # cached (id(model), parameters)

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        return StateNeeds(sharded_bytes=self.copies * self.dtype.itemsize * size.parameters)

    def importance(self, ctx: Context, names: list[str]) -> list[torch.Tensor] | None:
        raise NotImplementedError

    def parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        if self._params is None or self._params[0] != id(model):
            named = dict(model.named_parameters())
            self._params = (id(model), [named[n] for n in self.names or []])
        return self._params[1]

    def check(self, ctx: Context) -> None:
        """``penalised_params`` must match some trainable parameter now, not when the first task is over."""
        super().check(ctx)
        pattern = self.cfg.penalised_params
        names = [n for n, _ in trainable_parameters(ctx.model)]
        if pattern is not None and not any(re.search(pattern, n) for n in names):
            example = f" (searched with re.search in names such as {names[0]!r})" if names else ""
            raise ConfigError(f"strategy.penalised_params: {pattern!r} matches no trainable parameter name{example}")
        device = getattr(ctx, "device", None)  # None (a bare context in tests): nothing to compare with
        refuse_state_unless_fits(ctx.model, device, self.memory_need(ctx), f"{self.name}'s state and passes",
                                 "strategy.penalised_params", "penalise fewer parameters (strategy.penalised_params), "
                                 "set strategy.state_dtype=bfloat16, or use a smaller model")

    def memory_need(self, ctx: Context) -> int:
        """Bytes this strategy needs beyond the model and the optimizer, at least (``memory.py``): its importance
        and anchor, ``extra_copies`` fp32 copies, one example of its estimation pass (``batch_option``)."""
        numel, itemsize = numel_and_itemsize(p for _, p in selected_parameters(ctx.model, self.cfg.penalised_params))
        state = anchor_state_bytes(numel, getattr(torch, self.cfg.state_dtype).itemsize) + self.extra_copies * 4 * numel
        return state + (estimation_bytes(numel, itemsize) if self.batch_option else 0)

    def after_task(self, ctx: Context) -> None:
        if self.names is None:
            self.names = [n for n, _ in selected_parameters(ctx.model, self.cfg.penalised_params)]
        params = self.parameters(ctx.model)
        theta = [local(p.detach()) for p in params]
        self.numel = sum(p.numel() for p in params)
        self._place(params)  # state loaded from a checkpoint may sit on the CPU, or be whole
        new = self.importance(ctx, self.names)
        if self.anchor is None or (self.online and new is not None):
            old = self.fisher if self.anchor is not None else None
            if old is not None:
                new = [self.gamma * a.float() + b for a, b in zip(old, new, strict=True)]
            self.fisher = new
            self.anchor, self.weight, self.const = [t.clone() for t in theta], 1.0, 0.0
        else:  # pre-sum: merge the new task's quadratic into the stored one
            uniform = new is None
            anchor, fisher, consts = [], [], []
            for i, t in enumerate(theta):
                f_old = torch.full_like(t, self.weight) if self.fisher is None else self.fisher[i]
                f_new = torch.ones_like(t) if uniform else new[i]
                f, m, c = merge_quadratics(f_old, self.anchor[i], f_new, t)
                anchor.append(m.to(self.dtype))  # cast tensor by tensor: no full fp32 copy of the state
                fisher.append(f.to(self.dtype))
                consts.append(c)
            added = torch.stack(consts).cpu().double().sum()  # on the host: one sync, any device
            const = self.weight * self.const + float(all_reduce_sum(added) if world().sharded else added)
            self.weight = self.weight + 1.0 if uniform else 1.0
            self.anchor, self.fisher, self.const = anchor, None if uniform else fisher, const / self.weight
        self.anchor = [m.to(self.dtype) for m in self.anchor]
        self.fisher = None if self.fisher is None else [f.to(self.dtype) for f in self.fisher]

    def after_backward(self, ctx: Context) -> None:
        if self.anchor is None or self.lam == 0:
            return
        params = self.parameters(ctx.model)
        self._place(params)
        if ctx.step % LOG_EVERY == 0:  # a pass over the penalised parameters: not every step
            ctx.log(**{f"{self.name}_penalty": self.penalty_tensor(ctx.model)})
        add_penalty_grad_(params, self.anchor, self.fisher, self.lam * self.weight)

    def penalty(self, model: torch.nn.Module) -> float:
        """The penalty value ``lam/2 * weight * (sum F (theta - m)^2 + C)`` (syncs with the device)."""
        return float(self.penalty_tensor(model))

    def penalty_tensor(self, model: torch.nn.Module) -> torch.Tensor:
        """The penalty value as a 0-dim fp32 tensor on the parameters' device (no host sync)."""
        if self.anchor is None:
            return torch.zeros(())
        params = self.parameters(model)
        self._place(params)
        total = quadratic_sum(params, self.anchor, self.fisher)
        return 0.5 * self.lam * self.weight * (total + self.const)

    def _place(self, params: list[torch.Tensor]) -> None:
        """The state as plain tensors on the parameters' device, each this rank's shard of its parameter (a
        checkpoint may hold it on the CPU, whole, or as DTensors)."""
        if self.anchor is None:
            return
        first = self.anchor[0]
        if hasattr(first, "to_local") or first.device != local(params[0]).device or first.shape != local(
                params[0]).shape:
            self.anchor = [shard_like(t, p) for t, p in zip(self.anchor, params, strict=True)]
            self.fisher = None if self.fisher is None else [
                shard_like(t, p) for t, p in zip(self.fisher, params, strict=True)]

    def accounting(self) -> dict[str, Any]:
        """Sizes of the whole state (every rank's shards together: the same at any process count)."""
        numel = self.numel
        copies = 0 if self.anchor is None else 1 if self.fisher is None else 2
        return {f"{self.name}_state_bytes": numel * copies * self.dtype.itemsize,
                f"{self.name}_parameters": numel if self.anchor is not None else 0}

    def state_dict(self) -> dict[str, Any]:
        """The state; under FSDP its shards as DTensors laid out like the parameters they were last used with."""
        params = self._params[1] if self._params else []
        anchor, fisher = self.anchor, self.fisher
        if params and world().sharded and anchor is not None:
            anchor = [sharded_view(t, p) for t, p in zip(anchor, params, strict=True)]
            fisher = None if fisher is None else [sharded_view(t, p) for t, p in zip(fisher, params, strict=True)]
        return {"names": self.names, "anchor": anchor, "fisher": fisher, "weight": self.weight,
                "const": self.const}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names, self.anchor, self.fisher = state["names"], state["anchor"], state["fisher"]
        self.weight, self.const, self._params = float(state["weight"]), float(state["const"]), None
        self.numel = sum(t.numel() for t in self.anchor or [])  # whole tensors or DTensors: every rank's part
