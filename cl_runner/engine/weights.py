"""A model's weights as checkpoints hold them: tied weights stored once, a CPU copy of the best weights, and
whether stored names and shapes fit a model (DTensors: each rank compares its own shards), and strategy state
that equals stored weights kept as references to them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cl_runner.core import dist


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``torch.compile`` wrapper (the model itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard; a plain tensor itself)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def copy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights, as the loop keeps its best weights (DTensors stay DTensors)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def same_weights(best: dict[str, torch.Tensor] | None, model: torch.nn.Module) -> bool:
    """Whether the best weights are the model's current ones (the best epoch is the one just finished), on every
    rank (each compares its own shards)."""
    if best is None:
        return False
    current = unwrap(model).state_dict()
    same = best.keys() == current.keys() and all(torch.equal(local(best[k]).cpu(), local(v).cpu())
                                                 for k, v in current.items())
    return not dist.all_reduce_max([float(not same)])[0]


def _tied(model: torch.nn.Module) -> dict[str, str]:
    """The model's tied weights: each name of a parameter that an earlier name already holds -> that name."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        first.setdefault(id(param), name)
    return tied


def untied(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``weights`` without the second names of tied weights (a copy of the weights holds them twice)."""
    tied = _tied(model)
    return {k: v for k, v in weights.items() if k not in tied}


def retied(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``weights`` with the second names of tied weights back (the same tensor), as ``load_state_dict`` wants."""
    return weights | {k: weights[first] for k, first in _tied(model).items() if k not in weights and first in weights}


def weights_mismatch(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]],
                     best_shapes: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """How stored weights (``shapes``: name -> shape, as in ``model.safetensors``) and stored best weights fail
    to fit ``model``'s names and shapes, or None."""
    expected = {k.removeprefix("_orig_mod."): v for k, v in unwrap(model).state_dict().items()}
    problem = _compare("model.safetensors", shapes, expected)
    if problem is None and best_shapes is not None:
        best = {k.removeprefix("_orig_mod."): v for k, v in best_shapes.items()}
        problem = _compare("best.safetensors", best, expected)
    return problem


def _compare(file: str, shapes: dict[str, tuple[int, ...]], expected: dict[str, torch.Tensor]) -> str | None:
    stored = {local(expected[k]).data_ptr() for k in shapes if k in expected}  # tied weights are saved once
    names = {"not in the model": sorted(set(shapes) - set(expected)),
             "missing": sorted(k for k, t in expected.items()
                               if k not in shapes and local(t).data_ptr() not in stored)}
    for what, found in names.items():
        if found:
            return f"{file}: {len(found)} weights {what} ({', '.join(found[:3])}{', ...' * (len(found) > 3)})"
    wrong = [f"{file}: {k} is {list(shapes[k])}, the model's is {list(t.shape)}"
             for k, t in expected.items() if k in shapes and tuple(t.shape) != shapes[k]]
    return wrong[0] if wrong else None


# A strategy's state often holds copies of the weights a checkpoint already stores (LwF's teacher and online EWC's
# anchor at a task's end, EWC's anchor after the first task): state.pt stores such a tensor as a reference to the
# weight of that name in model.safetensors, and reading the checkpoint puts the weight back.
WEIGHT_REF = "__cl_weight__"
MIN_REF_NUMEL = 1024  # smaller tensors are stored as they are (a reference would save next to nothing)


def by_reference(obj: Any, weights: dict[str, torch.Tensor], key: str | None = None) -> Any:
    """``obj`` (nested dicts, lists, tuples) with every tensor equal to one of ``weights`` (same dtype, shape,
    device and values) replaced by ``{WEIGHT_REF: name}``; a dict key naming a weight is tried first."""
    if isinstance(obj, dict):
        return {k: by_reference(v, weights, k if isinstance(k, str) else None) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(by_reference(v, weights) for v in obj)
    if not isinstance(obj, torch.Tensor) or obj.numel() < MIN_REF_NUMEL or type(obj) is not torch.Tensor:
        return obj
    candidates = ([key] if key in weights else []) + [n for n, w in weights.items() if n != key]
    for name in candidates:
        w = weights[name]
        if (w.shape == obj.shape and w.dtype == obj.dtype and w.device == obj.device
                and bool(w.reshape(-1)[0] == obj.reshape(-1)[0]) and torch.equal(w, obj)):  # cheap test first
            return {WEIGHT_REF: name}
    return obj


def resolved(obj: Any, weight: Callable[[str], torch.Tensor]) -> Any:
    """``by_reference`` undone: each reference replaced by ``weight(name)``."""
    if isinstance(obj, dict):
        if set(obj) == {WEIGHT_REF}:
            return weight(obj[WEIGHT_REF])
        return {k: resolved(v, weight) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(resolved(v, weight) for v in obj)
    return obj
