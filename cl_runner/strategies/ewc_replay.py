"""EWC and experience replay together, by composition: every hook runs the EWC part, then the replay part."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from cl_runner.lm import Encoded
from cl_runner.strategies.base import Context, Strategy
from cl_runner.strategies.ewc import EWC
from cl_runner.strategies.replay import Replay


class EWCReplay(Strategy):
    """Delegates each hook to an ``EWC`` and a ``Replay`` built from the same config (their options merged).

    Data hooks chain (EWC's output feeds replay), so replay mixes its buffer into the batches and EWC's
    penalty gradient covers the mixed batches; EWC's Fisher is estimated on the finished task's examples.
    """

    name = "ewc_replay"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.ewc, self.replay = EWC(cfg), Replay(cfg)
        self.parts: dict[str, Strategy] = {"ewc": self.ewc, "replay": self.replay}

    def before_task(self, ctx: Context) -> None:
        for part in self.parts.values():
            part.before_task(ctx)

    def train_dataset(self, ctx: Context, examples: list[Encoded]) -> list[Encoded]:
        for part in self.parts.values():
            examples = part.train_dataset(ctx, examples)
        return examples

    def validation_tasks(self, ctx: Context) -> list[int]:
        return sorted({t for part in self.parts.values() for t in part.validation_tasks(ctx)})

    def train_batches(self, ctx: Context, batches: Iterable[list[Encoded]]) -> Iterator[list[Encoded]]:
        for part in self.parts.values():
            batches = part.train_batches(ctx, batches)
        yield from batches

    def loss(
        self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor
    ) -> torch.Tensor:
        for part in self.parts.values():
            loss = part.loss(ctx, batch, outputs, loss)
        return loss

    def after_backward(self, ctx: Context) -> None:
        for part in self.parts.values():
            part.after_backward(ctx)

    def after_step(self, ctx: Context) -> None:
        for part in self.parts.values():
            part.after_step(ctx)

    def after_task(self, ctx: Context) -> None:
        for part in self.parts.values():
            part.after_task(ctx)

    def before_eval(self, ctx: Context, task_index: int) -> None:
        for part in self.parts.values():
            part.before_eval(ctx, task_index)

    def accounting(self) -> dict[str, Any]:
        return {k: v for part in self.parts.values() for k, v in part.accounting().items()}

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
