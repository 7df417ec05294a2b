"""Small helpers the strategies share: parameter selection, eval mode for no-grad passes, byte counts."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from cl_runner.strategies.base import trainable_parameters


def selected_parameters(model: torch.nn.Module, pattern: str | None) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable ``(name, parameter)`` pairs whose name matches ``pattern`` (``re.search``); all when None."""
    named = trainable_parameters(model)
    if pattern is not None:
        regex = re.compile(pattern)
        named = [(n, p) for n, p in named if regex.search(n)]
        if not named:
            raise ValueError(f"ewc_params: {pattern!r} matches no trainable parameter name")
    return named


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (no dropout) for a scoring pass, restoring the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
