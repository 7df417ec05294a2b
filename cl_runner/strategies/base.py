"""The strategy interface: explicit no-op hooks that the run and the loop call by name.

A strategy overrides only the hooks it needs. Hooks never touch files or Hydra; everything they may use is on
the ``Context``. Order within one task::

    before_task -> train_dataset -> [train_batches -> (loss per micro-batch) -> after_backward
    -> after_step]* -> after_task;   before_eval(task) before scoring each task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from cl_runner.lm import Encoded


@dataclass
class Context:
    """Everything a hook may look at. The loop updates ``optimizer``, ``step`` and ``epoch`` as it goes."""

    model: torch.nn.Module
    device: torch.device
    autocast: Callable[[], AbstractContextManager]  # a fresh autocast context (nullcontext on CPU/fp32)
    collate: Callable[[list[Encoded]], dict[str, torch.Tensor]]  # encoded examples -> batch on device
    task_names: list[str]
    train_sets: list[list[Encoded]]  # encoded training examples of every task of the sequence
    task_index: int = 0
    batch_size: int = 1
    seed: int = 0
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0  # optimizer steps taken in the current task
    epoch: int = 0
    extras: dict[str, Any] = field(default_factory=dict)  # numbers a strategy logs (penalty, buffer size, ...)
    artifacts: dict[str, str] = field(default_factory=dict)  # file name -> text the run writes to its directory
    eos_id: int | None = None  # the tokenizer's EOS id (ends every target); None when unknown
    decode: Callable[[list[int]], str] | None = None  # token ids -> text, for artifacts users read

    @property
    def task_name(self) -> str:
        return self.task_names[self.task_index]

    def generator(self, salt: int = 0) -> torch.Generator:
        """A torch RNG seeded from the run seed, the task and ``salt``: strategies draw from it, never globally."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.task_index * 7919 + salt)


class Strategy:
    """Plain sequential fine-tuning: every hook is a no-op. Subclasses override what they need."""

    name = "naive"

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg

    def before_task(self, ctx: Context) -> None:
        """Called before training task ``ctx.task_index`` (snapshot a teacher, add an adapter...)."""

    def train_dataset(self, ctx: Context, examples: list[Encoded]) -> list[Encoded]:
        """The examples to train on for this task (joint training returns all tasks seen so far)."""
        return examples

    def validation_tasks(self, ctx: Context) -> list[int]:
        """Indices of the tasks whose validation score picks the best epoch."""
        return [ctx.task_index]

    def train_batches(self, ctx: Context, batches: Iterable[list[Encoded]]) -> Iterator[list[Encoded]]:
        """The micro-batches (lists of encoded examples) actually trained on; replay mixes its buffer in."""
        yield from batches

    def loss(
        self, ctx: Context, batch: dict[str, torch.Tensor], outputs: Any, loss: torch.Tensor
    ) -> torch.Tensor:
        """The loss to minimise for one micro-batch; return ``loss + penalty``, never modify in place."""
        return loss

    def after_backward(self, ctx: Context) -> None:
        """Gradients of one optimizer step are complete (unscaled, before clipping): gradient surgery here."""

    def after_step(self, ctx: Context) -> None:
        """After each optimizer step (meta-updates, buffer bookkeeping)."""

    def after_task(self, ctx: Context) -> None:
        """After training task ``ctx.task_index`` (best weights restored): estimate a Fisher, fill a buffer..."""

    def before_eval(self, ctx: Context, task_index: int) -> None:
        """Before scoring task ``task_index`` (select that task's adapter, for instance)."""

    def accounting(self) -> dict[str, Any]:
        """Costs to report in metrics.json: extra parameters kept, buffer sizes, ..."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this strategy exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def on_resume(self, ctx: Context) -> None:
        """After ``load_state_dict`` on resume, before the checkpoint's weights are loaded into ``ctx.model``:
        re-create any modules the strategy had added to the model (adapters), so the weights fit."""


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
