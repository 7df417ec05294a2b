"""Meta-experience replay (Riemer et al. 2019): replay's mixed batches, trained with Reptile meta-updates."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from cl_runner.lm import Encoded
from cl_runner.strategies.base import Context, Strategy, trainable_parameters
from cl_runner.strategies.common import tensor_bytes
from cl_runner.strategies.replay import Replay


@torch.no_grad()
def reptile_update(params: dict[str, torch.Tensor], start: dict[str, torch.Tensor], rate: float) -> None:
    """``theta <- theta_0 + rate * (theta - theta_0)`` in place (``rate = 1`` leaves ``theta`` untouched)."""
    if rate == 1:
        return
    for name, p in params.items():
        p.lerp_(start[name].to(p.device), 1.0 - rate)


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


class MER(Strategy):
    """Batches, buffer and its filling are exactly replay's (a ``Replay`` part does them). The run's own
    optimizer steps are MER's inner steps; every ``inner_steps`` steps (a meta-batch: that many consecutive
    replay-mixed micro-batches trained one after the other) the within-batch Reptile step
    ``theta <- theta_W0 + beta (theta - theta_W0)`` moves back towards the weights at the start of the
    meta-batch, and every ``meta_batches`` meta-batches the across-batch step does the same with ``gamma``
    from the weights at the start of the group. A meta-batch never spans an epoch: the epoch's last one may be
    shorter, so the weights validated (and kept as best) at the end of an epoch are meta-updated ones.

    Differences from the paper: the inner steps use the run's optimizer (AdamW, its schedule and clipping)
    on micro-batches rather than plain SGD on single examples, and each meta-batch of a group has its own new
    examples (the paper repeats the current one in its ``s`` batches), so the run keeps the budget of the
    other strategies. With ``inner_steps = 1`` and ``beta = gamma = 1`` no meta-update happens: MER is
    exactly replay (same buffer, same batches, same steps).
    """

    name = "mer"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.replay = Replay(cfg)
        self.window = 0  # inner steps taken in the current meta-batch
        self.group = 0  # meta-batches finished in the current across-batch group
        self.start_batch: dict[str, torch.Tensor] = {}  # theta_W0
        self.start_group: dict[str, torch.Tensor] = {}  # theta_A0
        self.trainable = self.snapshot_bytes = 0

    def _params(self, ctx: Context) -> dict[str, torch.Tensor]:
        return dict(trainable_parameters(ctx.model))

    def _meta(self) -> bool:
        return self.cfg.beta != 1 or self.cfg.gamma != 1

    def before_task(self, ctx: Context) -> None:
        self.replay.before_task(ctx)
        self.window = self.group = 0
        params = self._params(ctx)
        self.trainable = sum(p.numel() for p in params.values())
        self.start_batch = self.start_group = snapshot(params) if self._meta() else {}
        copies = 1 if self.cfg.meta_batches == 1 else 2
        self.snapshot_bytes = tensor_bytes(self.start_batch.values()) * copies

    def train_batches(self, ctx: Context, batches: Iterable[list[Encoded]]) -> Iterator[list[Encoded]]:
        yield from self.replay.train_batches(ctx, batches)
        if self.window:  # the epoch ends: close its last, shorter meta-batch before validation
            self._close_batch(ctx)

    def after_step(self, ctx: Context) -> None:
        self.replay.after_step(ctx)
        self.window += 1
        if self.window == self.cfg.inner_steps:
            self._close_batch(ctx)

    def _close_batch(self, ctx: Context) -> None:
        self.window, self.group = 0, self.group + 1
        if not self._meta():
            self.group %= self.cfg.meta_batches
            return
        params = self._params(ctx)
        reptile_update(params, self.start_batch, self.cfg.beta)
        if self.group == self.cfg.meta_batches:
            reptile_update(params, self.start_group, self.cfg.gamma)
            self.group, self.start_group = 0, snapshot(params)
        self.start_batch = self.start_group if self.group == 0 else snapshot(params)

    def after_task(self, ctx: Context) -> None:
        self.replay.after_task(ctx)
        self.start_batch, self.start_group = {}, {}  # only needed within a task

    def accounting(self) -> dict[str, Any]:
        return {"trainable_parameters": self.trainable, **self.replay.accounting(),
                "snapshot_bytes": self.snapshot_bytes}  # weight copies held within a task

    def state_dict(self) -> dict[str, Any]:
        def host(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to("cpu") for k, v in weights.items()}

        return {"replay": self.replay.state_dict(), "window": self.window, "group": self.group,
                "start_batch": host(self.start_batch), "start_group": host(self.start_group),
                "trainable": self.trainable, "snapshot_bytes": self.snapshot_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replay.load_state_dict(state["replay"])
        self.window, self.group = int(state["window"]), int(state["group"])
        self.start_batch, self.start_group = state["start_batch"], state["start_group"]  # moved on first use
        self.trainable, self.snapshot_bytes = int(state["trainable"]), int(state["snapshot_bytes"])
