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
            raise ValueError(f"penalised_params: {pattern!r} matches no trainable parameter name")
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


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter or gradient (a DTensor; in place edits reach the parameter), else
    ``tensor`` itself: strategy state kept per parameter lives with the parameter's shard, never a full copy."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the full shape of ``param``, or a DTensor laid out like it) as this rank's shard of ``param``,
    on its device: how state saved by another process count is put back (each rank cuts its own piece)."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    if not hasattr(param, "to_local") or tensor.shape == local(param).shape:
        return tensor.to(local(param).device)
    from torch.distributed.tensor import distribute_tensor

    full = tensor.to(local(param).device)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def sharded_view(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard ``tensor`` as a DTensor laid out like ``param`` (for a sharded checkpoint), or as it is."""
    if not hasattr(param, "to_local"):
        return tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(tensor, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())
