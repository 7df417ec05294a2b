"""Meta-experience replay (Riemer et al. 2019): replay's mixed batches, trained with Reptile meta-updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_runner.core.checks import check_positive
from cl_runner.core.lazy import no_grad
from cl_runner.strategies.base import Context, Strategy, trainable_parameters
from cl_runner.strategies.common import local, shard_like, tensor_bytes
from cl_runner.strategies.compose import Composite
from cl_runner.strategies.replay import Replay, ReplayConfig
from cl_runner.strategies.support import combined


@dataclass
class MERConfig(ReplayConfig):
    name: str = "mer"
    inner_steps: int = 5  # optimizer steps (replay-mixed step batches) per meta-batch
    beta: float = 0.5  # within-batch Reptile rate: theta_0 + beta (theta - theta_0)
    gamma: float = 1.0  # across-batch Reptile rate, every meta_batches meta-batches
    meta_batches: int = 1  # meta-batches per across-batch update

    def errors(self, key: str) -> list[str]:
        errs = super().errors(key)
        check_positive(errs, f"{key}.inner_steps", self.inner_steps)
        check_positive(errs, f"{key}.meta_batches", self.meta_batches)
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                errs.append(f"{key}.{name}: expected a value in (0, 1], got {value!r}")
        return errs


@no_grad
def reptile_update(params: dict[str, torch.Tensor], start: dict[str, torch.Tensor], rate: float) -> None:
    """``theta <- theta_0 + rate * (theta - theta_0)`` in place (``rate = 1`` leaves ``theta`` untouched); under
    FSDP on this rank's shard (element-wise: each rank updates its own)."""
    if rate == 1:
        return
    for name, p in params.items():
        local(p).lerp_(shard_like(start[name], p), 1.0 - rate)


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


class Reptile(Strategy):
    """The meta-update half of MER. The run's own optimizer steps are the inner steps; every ``inner_steps``
    steps (a meta-batch) the within-batch Reptile step ``theta <- theta_W0 + beta (theta - theta_W0)`` moves
    back towards the weights at the start of the meta-batch, and every ``meta_batches`` meta-batches the
    across-batch step does the same with ``gamma`` from the weights at the start of the group. A meta-batch
    never spans an epoch: ``after_epoch`` closes the epoch's last, possibly shorter one (also when the task's
    step budget ends the epoch), so the weights validated and kept as best are meta-updated ones."""

    name = "reptile"  # a part of MER, not a strategy of its own (no ``Config``: it is not registered)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
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
        self.window = self.group = 0
        params = self._params(ctx)
        self.trainable = sum(p.numel() for p in params.values())
        self.start_batch = self.start_group = snapshot(params) if self._meta() else {}
        copies = 1 if self.cfg.meta_batches == 1 else 2
        self.snapshot_bytes = tensor_bytes(self.start_batch.values()) * copies

    def after_step(self, ctx: Context) -> None:
        self.window += 1
        if self.window == self.cfg.inner_steps:
            self._close_batch(ctx)

    def after_epoch(self, ctx: Context) -> None:
        if self.window:
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
        self.start_batch, self.start_group = {}, {}  # only needed within a task

    def accounting(self) -> dict[str, Any]:
        return {"trainable_parameters": self.trainable,
                "snapshot_bytes": self.snapshot_bytes}  # weight copies held within a task

    def state_dict(self) -> dict[str, Any]:
        def host(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # FSDP shards stay DTensors
            return {k: v if hasattr(v, "to_local") else v.to("cpu") for k, v in weights.items()}

        return {"window": self.window, "group": self.group, "start_batch": host(self.start_batch),
                "start_group": host(self.start_group), "trainable": self.trainable,
                "snapshot_bytes": self.snapshot_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window, self.group = int(state["window"]), int(state["group"])
        self.start_batch, self.start_group = state["start_batch"], state["start_group"]  # moved on first use
        self.trainable, self.snapshot_bytes = int(state["trainable"]), int(state["snapshot_bytes"])


class MER(Composite):
    """Replay (its buffer, its filling, its mixed batches: a ``Replay`` part) trained with ``Reptile``
    meta-updates.

    Differences from the paper: the inner steps use the run's optimizer (AdamW, its schedule and clipping)
    on replay-mixed step batches (whatever ``train.grad_accum`` cuts them into) rather than plain SGD on single
    examples, and each meta-batch of a group has its own new examples (the paper repeats the current one in
    its ``s`` batches), so the run keeps the budget of the other strategies. With ``inner_steps = 1`` and
    ``beta = gamma = 1`` no meta-update happens: MER is exactly replay (same buffer, same batches, same steps).
    """

    name = "mer"
    Config = MERConfig
    supports = combined(Replay, Reptile)

    def __init__(self, cfg: Any) -> None:
        self.replay, self.reptile = Replay(cfg), Reptile(cfg)
        super().__init__(cfg, [self.replay, self.reptile])
