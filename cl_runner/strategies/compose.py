"""Several strategies as one: every hook runs each part in order (Avalanche's ``trigger_plugins`` in spirit)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from cl_runner.models.lm import Encoded
from cl_runner.strategies.base import Context, ModelSize, StateNeeds, Strategy, Takeaway


def _forward(hook: str) -> Callable[..., None]:
    """A hook that calls ``hook`` on every part, in order, with the same arguments."""

    def forward(self: Composite, ctx: Context, *args: Any) -> None:
        for part in self.parts:
            getattr(part, hook)(ctx, *args)

    forward.__name__ = forward.__qualname__ = hook
    forward.__doc__ = getattr(Strategy, hook).__doc__
    return forward


class Composite(Strategy):
    """Runs ``parts`` for every hook, in order. Data hooks chain: ``train_dataset``, ``train_batches`` and
    ``loss`` feed each part the previous part's output (EWC then replay: replay mixes its buffer into the
    batches, and EWC's penalty covers the mixed batches); ``validation_tasks`` is the union of the parts';
    ``accounting`` merges the parts' dicts; ``state_dict`` keeps one entry per part, under the part's
    ``state_key`` (its ``name`` unless two parts share one). A subclass declares the facts of its parts
    together: ``supports = combined(PartA, PartB)`` (``support.py``)."""

    def __init__(self, cfg: Any, parts: Sequence[Strategy]) -> None:
        super().__init__(cfg)
        self.parts = list(parts)
        names = [part.name for part in self.parts]
        self.keys = [name if names.count(name) == 1 else f"{i}_{name}" for i, name in enumerate(names)]

    def check(self, ctx: Context) -> None:
        super().check(ctx)  # the composite's own facts, then each part's checks
        for part in self.parts:
            part.check(ctx)

    def memory_needs(self, size: ModelSize) -> StateNeeds:
        return sum((part.memory_needs(size) for part in self.parts), StateNeeds())

    def takeaway(self, ctx: Context) -> Takeaway:
        """The first part's that is not the plain model's (at most one part adds modules)."""
        return next((t for t in (part.takeaway(ctx) for part in self.parts) if t != Takeaway()), Takeaway())

    before_shard = _forward("before_shard")
    before_task = _forward("before_task")
    before_epoch = _forward("before_epoch")
    after_epoch = _forward("after_epoch")
    after_backward = _forward("after_backward")
    after_step = _forward("after_step")
    after_task = _forward("after_task")
    before_eval = _forward("before_eval")
    after_eval = _forward("after_eval")
    on_resume = _forward("on_resume")

    def train_dataset(self, ctx: Context, examples: list[Encoded]) -> list[Encoded]:
        for part in self.parts:
            examples = part.train_dataset(ctx, examples)
        return examples

    def validation_tasks(self, ctx: Context) -> list[int]:
        return sorted({t for part in self.parts for t in part.validation_tasks(ctx)})

    def train_batches(self, ctx: Context, batches: Iterable[list[Encoded]]) -> Iterator[list[Encoded]]:
        for part in self.parts:
            batches = part.train_batches(ctx, batches)
        yield from batches

    def loss(self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            loss = part.loss(ctx, batch, outputs, loss)
        return loss

    def accounting(self) -> dict[str, Any]:
        return {k: v for part in self.parts for k, v in part.accounting().items()}

    def state_dict(self) -> dict[str, Any]:
        return {key: part.state_dict() for key, part in zip(self.keys, self.parts, strict=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, part in zip(self.keys, self.parts, strict=True):
            part.load_state_dict(state[key])
