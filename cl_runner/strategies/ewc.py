"""Elastic weight consolidation (Kirkpatrick et al. 2017; online: Schwarz et al. 2018) and the L2 anchor.

Both penalise ``lam/2 * sum_k sum_i F_k,i (theta_i - theta_k,i)^2`` over the finished tasks k and apply it as
an analytic gradient after the backward pass (see ``anchor.py``); L2 is the same with every F = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_choice, check_fraction, check_positive
from cl_runner.strategies.anchor import AnchorConfig, AnchorPenalty
from cl_runner.strategies.base import Context, ModelSize, StateNeeds
from cl_runner.strategies.common import selected_parameters
from cl_runner.strategies.fisher import MODES, fisher_diagonal
from cl_runner.strategies.memory import AUTO, AUTO_MAX_BATCH, check_batch, estimation_batch, parse_batch
from cl_runner.strategies.support import Refused, Supports

SUBSET_SALT = 21  # ctx.generator salts: which examples estimate the Fisher
SAMPLE_SALT = 22  # ... and the labels drawn for fisher=sampled


@dataclass
class L2Config(AnchorConfig):
    name: str = "l2"
    l2_lambda: float = 1.0  # penalty weight: l2_lambda/2 * sum (theta - theta*)^2

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.l2_lambda", self.l2_lambda, allow_zero=True)
        self.anchor_errors(errs, key)
        return errs


@dataclass
class EWCConfig(AnchorConfig):
    name: str = "ewc"
    ewc_lambda: float = 1.0e5  # penalty weight: ewc_lambda/2 * sum F (theta - theta*)^2
    fisher: str = "empirical"  # empirical (labels from the data) | sampled (labels sampled from the model)
    fisher_samples: int = 256  # examples of the finished task used to estimate the Fisher
    # examples per batched per-example-gradient chunk: auto = the most (up to 16) whose gradients fit in half the
    # free memory (strategies/memory.py), or a positive integer. The Fisher does not depend on it beyond float
    # rounding (each example's gradient is its own; the sum's order changes)
    fisher_batch_size: Any = AUTO
    online: bool = False  # one running Fisher (online EWC) instead of one per task
    gamma: float = 1.0  # online EWC decay of the old Fisher

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        check_positive(errs, f"{key}.ewc_lambda", self.ewc_lambda, allow_zero=True)
        check_choice(errs, f"{key}.fisher", self.fisher, MODES)
        check_positive(errs, f"{key}.fisher_samples", self.fisher_samples)
        check_batch(errs, f"{key}.fisher_batch_size", self.fisher_batch_size)
        check_fraction(errs, f"{key}.gamma", self.gamma)
        self.anchor_errors(errs, key)
        return errs


class EWC(AnchorPenalty):
    """Per-task Fishers and anchors pre-summed into one quadratic, or online EWC (``online``, ``gamma``).

    After each task, F is estimated (``fisher_diagonal``) on ``fisher_samples`` examples of that task drawn
    uniformly without replacement (all of them when the task is smaller). The penalty value is logged as
    ``ewc_penalty`` every ``LOG_EVERY`` steps.
    """

    name = "ewc"
    Config = EWCConfig
    batch_option = "fisher_batch_size"
    supports = Supports(encoder_decoder=Refused("it samples labels in the causal layout; use empirical",
                                                option="fisher", when=lambda cfg: cfg.fisher == "sampled"))

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, lam=cfg.ewc_lambda)
        self.online, self.gamma = cfg.online, cfg.gamma

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        """The anchor and Fisher, and the Fisher's pass: ``fisher_batch_size`` examples' gradients at once."""
        # auto: at most AUTO_MAX_BATCH, fewer where free memory is short when the pass starts
        return super().memory_needs(size) + StateNeeds(
            gradient_examples=min(parse_batch(self.cfg.fisher_batch_size) or AUTO_MAX_BATCH, self.cfg.fisher_samples))

    def estimate_fisher(self, ctx: Context) -> dict[str, torch.Tensor]:
        """The diagonal Fisher of the model on the current task: deterministic given the run seed and task."""
        examples = ctx.train_sets[ctx.task_index]
        picks = torch.randperm(len(examples), generator=ctx.generator(SUBSET_SALT))[: self.cfg.fisher_samples]
        params = [p for _, p in selected_parameters(ctx.model, self.cfg.penalised_params)]
        return fisher_diagonal(ctx, [examples[i] for i in sorted(picks.tolist())], mode=self.cfg.fisher,
                               generator=ctx.generator(SAMPLE_SALT), param_regex=self.cfg.penalised_params,
                               batch_size=estimation_batch(self.cfg.fisher_batch_size, params, ctx.device))

    def importance(self, ctx: Context, names: list[str]) -> list[torch.Tensor]:
        fisher = self.estimate_fisher(ctx)
        return [fisher[n] for n in names]


class L2(AnchorPenalty):
    """``l2_lambda/2 * sum_k ||theta - theta_k||^2`` over the finished tasks' weights (EWC with F = 1)."""

    name = "l2"
    Config = L2Config
    copies = 1  # the anchor

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, lam=cfg.l2_lambda)

    def importance(self, ctx: Context, names: list[str]) -> None:
        return None
