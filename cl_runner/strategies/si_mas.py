"""Synaptic intelligence (Zenke et al. 2017) and memory-aware synapses (Aljundi et al. 2018): importance-weighted
quadratic anchors, on the machinery EWC has (``anchor.py``: one pre-summed quadratic, its gradient added after the
backward pass, DTensor shards under FSDP). They differ from EWC only in the importance ``Omega`` of each weight.

SI. During task k, every optimizer step adds ``-g * delta`` to a running path integral ``omega`` (per weight):
``g`` is the gradient of the step's *task* loss (the loop's loss with the strategy's other terms, before this
penalty's gradient is added and before clipping: the gradient ``after_backward`` sees on entry), ``delta`` the
change the optimizer step made to the weight (AdamW, clipping, the learning rate schedule included). The loop calls
``after_backward`` once per optimizer step with the whole step's gradient, so ``omega`` does not depend on
``train.grad_accum``. At the task's end ``Omega_k = max(omega / (Delta^2 + xi), 0)`` with ``Delta`` the weight's
change over the whole task (negative values, which momentum can give, are clamped: the penalty stays a sum of
squares). A step the fp16 GradScaler skipped (inf gradient, no change) adds nothing.

MAS. After task k, ``Omega_k = 1/N sum_n |d s(x_n) / d theta|`` over ``mas_samples`` examples of the task, with
``s(x) = mean_t ||z_t||_2^2`` and ``z_t`` the logit vector (every vocabulary entry, before any softmax) at each
position t that predicts a target token of x (the positions the training loss uses; prompt and padding excluded).
Exact per-example gradients (``fisher.gradient_mean``: vmap in one batch, or one backward per example).

Both penalise ``lam/2 * sum Omega (theta - theta*)^2``. With ``online`` (the papers' form, the default) there is one
running importance ``Omega = gamma * Omega_old + Omega_k`` anchored at the latest task's weights; without, every
task keeps its own quadratic around its own weights, pre-summed like EWC's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_fraction, check_positive
from cl_runner.core.dist import world
from cl_runner.core.lazy import no_grad
from cl_runner.models.lm import target_mask
from cl_runner.strategies.anchor import AnchorConfig, AnchorPenalty
from cl_runner.strategies.base import Context, ModelSize, StateNeeds
from cl_runner.strategies.common import local, selected_parameters, shard_like, sharded_view
from cl_runner.strategies.fisher import gradient_mean
from cl_runner.strategies.memory import AUTO, AUTO_MAX_BATCH, check_batch, estimation_batch, parse_batch

SUBSET_SALT = 41  # ctx.generator salt: which examples of the finished task estimate MAS's importance


@dataclass
class ImportanceConfig(AnchorConfig):
    """Options of SI and MAS beyond the anchor's (``penalised_params``, ``state_dtype``)."""

    online: bool = True  # one running Omega = gamma*Omega_old + Omega_new at the latest weights (the papers')
    gamma: float = 1.0  # online: decay of the old importance

    def importance_errors(self, errs: list[str], key: str) -> None:
        check_fraction(errs, f"{key}.gamma", self.gamma)
        self.anchor_errors(errs, key)


@dataclass
class SIConfig(ImportanceConfig):
    name: str = "si"
    si_lambda: float = 1.0  # penalty weight: si_lambda/2 * sum Omega (theta - theta*)^2 (the paper's c = si_lambda/2)
    xi: float = 1.0e-3  # damping in Omega = omega / (Delta^2 + xi)

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.si_lambda", self.si_lambda, allow_zero=True)
        check_positive(errs, f"{key}.xi", self.xi)
        self.importance_errors(errs, key)
        return errs


@dataclass
class MASConfig(ImportanceConfig):
    name: str = "mas"
    mas_lambda: float = 3.0e-3  # penalty weight: mas_lambda/2 * sum Omega (theta - theta*)^2 (paper's lambda = /2)
    mas_samples: int = 256  # examples of the finished task the importance is averaged over
    mas_batch_size: Any = AUTO  # examples per per-example-gradient chunk: auto (as ewc's fisher_batch_size) | N

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.mas_lambda", self.mas_lambda, allow_zero=True)
        check_positive(errs, f"{key}.mas_samples", self.mas_samples)
        check_batch(errs, f"{key}.mas_batch_size", self.mas_batch_size)
        self.importance_errors(errs, key)
        return errs


def output_sq_norm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MAS's ``s(x)``: the mean over target-predicting positions of the squared L2 norm of the logits (fp32)."""
    mask = target_mask(labels)
    norms = logits[:, :-1].float().square().sum(-1)
    return (norms * mask).sum() / mask.sum().clamp_min(1)


def absolute(g: torch.Tensor) -> torch.Tensor:
    return g.abs()


class MAS(AnchorPenalty):
    """After each task, ``Omega`` from the finished task's examples (drawn without replacement, seeded)."""

    name = "mas"
    Config = MASConfig
    batch_option = "mas_batch_size"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, lam=cfg.mas_lambda)
        self.online, self.gamma = cfg.online, cfg.gamma

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """The anchor and Omega, and Omega's pass: ``mas_batch_size`` examples' gradients at once."""
        # auto: at most AUTO_MAX_BATCH, fewer where free memory is short when the pass starts
        return super().memory_needs(size) + StateNeeds(
            gradient_examples=min(parse_batch(self.cfg.mas_batch_size) or AUTO_MAX_BATCH, self.cfg.mas_samples))

    def importance(self, ctx: Context, names: list[str]) -> list[torch.Tensor]:
        examples = ctx.train_sets[ctx.task_index]
        picks = torch.randperm(len(examples), generator=ctx.generator(SUBSET_SALT))[: self.cfg.mas_samples]
        params = [p for _, p in selected_parameters(ctx.model, self.cfg.penalised_params)]
        omega = gradient_mean(ctx, [examples[i] for i in sorted(picks.tolist())], objective=output_sq_norm,
                              transform=absolute, param_regex=self.cfg.penalised_params,
                              batch_size=estimation_batch(self.cfg.mas_batch_size, params, ctx.device))
        return [omega[n] for n in names]


class SI(AnchorPenalty):
    """The path integral ``omega`` runs through each task (``after_backward`` keeps the step's task gradient and
    the weights, ``after_step`` adds ``-g * delta``); ``importance`` turns it into ``Omega_k`` at the task's end.
    State besides the quadratic: ``omega`` and the weights at the task's start (fp32, this rank's shards), and
    during a step two transient copies (the gradient, the weights before the step)."""

    name = "si"
    copies = 6  # anchor, importance, omega, the task's start; the step's gradient and weights (transient)
    Config = SIConfig
    extra_copies = 4  # omega and the task's start weights, and the two transient copies of a step (fp32)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, lam=cfg.si_lambda)
        self.online, self.gamma = cfg.online, cfg.gamma
        self.omega: list[torch.Tensor] | None = None  # this task's running sum of -g * delta
        self.start: list[torch.Tensor] | None = None  # the weights when the task began
        self._grad: list[torch.Tensor] | None = None  # the step's task gradient (transient)
        self._prev: list[torch.Tensor] | None = None  # the weights before the step (transient)

    @no_grad
    def before_task(self, ctx: Context) -> None:
        if self.names is None:
            self.names = [n for n, _ in selected_parameters(ctx.model, self.cfg.penalised_params)]
        theta = [local(p.detach()).float() for p in self.parameters(ctx.model)]
        self.omega, self.start = [torch.zeros_like(t) for t in theta], [t.clone() for t in theta]

    @no_grad
    def after_backward(self, ctx: Context) -> None:
        params = self._placed(ctx.model)
        grads = [torch.zeros_like(local(p), dtype=torch.float32) if p.grad is None else local(p.grad).float()
                 for p in params]
        theta = [local(p.detach()).float() for p in params]
        if self._grad is None:
            self._grad, self._prev = [g.clone() for g in grads], [t.clone() for t in theta]
        else:
            torch._foreach_copy_(self._grad, grads)
            torch._foreach_copy_(self._prev, theta)
        super().after_backward(ctx)  # the penalty's gradient, after the task gradient was kept

    @no_grad
    def after_step(self, ctx: Context) -> None:
        params = self.parameters(ctx.model)
        delta = torch._foreach_sub([local(p.detach()).float() for p in params], self._prev)
        torch._foreach_mul_(delta, self._grad)
        for omega, step in zip(self.omega, delta, strict=True):
            omega.sub_(step.nan_to_num_(0.0, 0.0, 0.0))  # a skipped fp16 step: inf gradient x zero change

    @no_grad
    def importance(self, ctx: Context, names: list[str]) -> list[torch.Tensor]:
        params = self._placed(ctx.model)
        moved = torch._foreach_sub([local(p.detach()).float() for p in params], self.start)
        torch._foreach_mul_(moved, moved)
        torch._foreach_add_(moved, self.cfg.xi)
        return [(o / d).clamp_min_(0) for o, d in zip(self.omega, moved, strict=True)]

    def _placed(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The penalised parameters, with ``omega`` and ``start`` as this rank's shards on their device (a
        checkpoint may hold them on the CPU, whole, or as DTensors)."""
        params = self.parameters(model)
        if self.omega is not None and (hasattr(self.omega[0], "to_local")
                                       or self.omega[0].device != local(params[0]).device
                                       or self.omega[0].shape != local(params[0]).shape):
            self.omega = [shard_like(t, p) for t, p in zip(self.omega, params, strict=True)]
            self.start = [shard_like(t, p) for t, p in zip(self.start, params, strict=True)]
        return params

    def accounting(self) -> dict[str, Any]:
        """The quadratic's state, plus the path integral's four fp32 copies (omega, start, gradient, weights) of
        the penalised parameters (every rank's shards together)."""
        params = self._params[1] if self._params else []
        return {**super().accounting(), "si_path_bytes": 4 * 4 * sum(p.numel() for p in params)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        omega, start = self.omega, self.start
        params = self._params[1] if self._params else []
        if params and world().sharded and omega is not None:
            omega = [sharded_view(t, p) for t, p in zip(omega, params, strict=True)]
            start = [sharded_view(t, p) for t, p in zip(start, params, strict=True)]
        return {**state, "omega": omega, "start": start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.omega, self.start = state["omega"], state["start"]
