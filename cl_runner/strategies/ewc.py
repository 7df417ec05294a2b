"""Elastic weight consolidation (Kirkpatrick et al. 2017; online: Schwarz et al. 2018) and the L2 anchor.

Both penalise ``lam/2 * sum_k sum_i F_k,i (theta_i - theta_k,i)^2`` over the finished tasks k and apply it as
an analytic gradient after the backward pass (see ``anchor.py``); L2 is the same with every F = 1.
"""

from __future__ import annotations

from typing import Any

import torch

from cl_runner.strategies.anchor import AnchorPenalty
from cl_runner.strategies.base import Context
from cl_runner.strategies.fisher import fisher_diagonal

SUBSET_SALT = 21  # ctx.generator salts: which examples estimate the Fisher
SAMPLE_SALT = 22  # ... and the labels drawn for fisher=sampled


class EWC(AnchorPenalty):
    """Per-task Fishers and anchors pre-summed into one quadratic, or online EWC (``online``, ``gamma``).

    After each task, F is estimated (``fisher_diagonal``) on ``fisher_samples`` examples of that task drawn
    uniformly without replacement (all of them when the task is smaller). The penalty value is written to
    ``ctx.extras["ewc_penalty"]`` every ``LOG_EVERY`` steps.
    """

    name = "ewc"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, lam=cfg.ewc_lambda)
        self.online, self.gamma = cfg.online, cfg.gamma

    def estimate_fisher(self, ctx: Context) -> dict[str, torch.Tensor]:
        """The diagonal Fisher of the model on the current task: deterministic given the run seed and task."""
        examples = ctx.train_sets[ctx.task_index]
        picks = torch.randperm(len(examples), generator=ctx.generator(SUBSET_SALT))[: self.cfg.fisher_samples]
        return fisher_diagonal(ctx, [examples[i] for i in sorted(picks.tolist())], mode=self.cfg.fisher,
                               generator=ctx.generator(SAMPLE_SALT), param_regex=self.cfg.ewc_params,
                               batch_size=self.cfg.fisher_batch_size)

    def importance(self, ctx: Context, names: list[str]) -> list[torch.Tensor]:
        fisher = self.estimate_fisher(ctx)
        return [fisher[n] for n in names]


class L2(AnchorPenalty):
    """``l2_lambda/2 * sum_k ||theta - theta_k||^2`` over the finished tasks' weights (EWC with F = 1)."""

    name = "l2"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg, lam=cfg.l2_lambda)

    def importance(self, ctx: Context, names: list[str]) -> None:
        return None
