"""The sharded part of a distributed run's checkpoint: ``torch.distributed.checkpoint`` (DCP) files that every rank
writes and reads together, each its own shards (``get_state_dict``/``set_state_dict``, so DDP and FSDP2 both work
and a resume on another process count reshards).

Every function here is a collective: every rank calls it, with the same directory. The layout around these
directories (``shards/``, ``best/``, ``state.pt``, the manifest) is checkpoint.py's; this module only knows DCP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cl_runner.engine.weights import copy_weights, retied, untied, unwrap


def write_shards(directory: Path, model: torch.nn.Module, state: dict[str, Any],
                 optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Write this rank's shards of the weights, of the optimizer state (with ``optimizer`` while a task runs) and
    of the strategy's DTensors into ``directory``; returns ``state`` as ``state.pt`` holds it then: the strategy
    state with placeholders, the task state without the optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    strategy, strategy_shards = split_dtensors(state["strategy"])
    task = state["task"]
    if task is not None and optimizer is not None:
        weights, optim = get_state_dict(unwrap(model), optimizer)
        shards: dict[str, Any] = {"model": untied(weights, model), "optim": optim}
        task = {k: v for k, v in task.items() if k != "optimizer"}
    else:
        shards = {"model": untied(get_model_state_dict(unwrap(model)), model)}
    shards |= {"strategy": strategy_shards} if strategy_shards else {}
    dcp.save(shards, storage_writer=dcp.FileSystemWriter(str(directory)))
    return {**state, "task": task, "strategy": strategy}


def write_best_shards(directory: Path, best: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Write this rank's shards of the best weights into ``directory`` (a DCP directory of its own)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"best": untied(best, model)}, storage_writer=dcp.FileSystemWriter(str(directory)))


def split_dtensors(obj: Any, found: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """``obj`` (nested dicts and lists) with each DTensor replaced by a plain placeholder (its DCP key, shape,
    dtype and placements), and the DTensors by key: the shards every rank writes through DCP."""
    found = {} if found is None else found
    if hasattr(obj, "placements") and hasattr(obj, "to_local"):
        key = str(len(found))
        found[key] = obj
        return {"__dcp__": key, "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch."),
                "placements": [_placement_code(p) for p in obj.placements]}, found
    if isinstance(obj, dict):
        return {k: split_dtensors(v, found)[0] for k, v in obj.items()}, found
    if isinstance(obj, (list, tuple)):
        return type(obj)(split_dtensors(v, found)[0] for v in obj), found
    return obj, found


def _placement_code(placement: Any) -> str:
    dim = getattr(placement, "dim", None)
    return f"S{dim}" if placement.is_shard() and dim is not None else "R"


def shard_shapes(directory: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """The global shapes of a DCP directory's tensors, by part: ``{"model": {name: shape}, "best": ...}`` (read from
    its ``.metadata``; no rank needs the others for this)."""
    from torch.distributed.checkpoint import FileSystemReader

    found: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, meta in FileSystemReader(str(directory)).read_metadata().state_dict_metadata.items():
        part, _, name = key.partition(".")
        if part in ("model", "best") and hasattr(meta, "size"):
            found.setdefault(part, {})[name] = tuple(meta.size)
    return found


def read_shards(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                best_directory: Path | None) -> dict[str, torch.Tensor] | None:
    """Load the weights in ``directory`` (and, with ``optimizer``, its state) into this rank's shards, resharded
    to the current process count; returns the best weights of ``best_directory`` (None without one), laid out like
    ``model.state_dict()`` on CPU."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    bare = unwrap(model)
    if optimizer is not None:
        weights, optim = get_state_dict(bare, optimizer)
        shards: dict[str, Any] = {"model": untied(weights, model), "optim": optim}
    else:
        shards = {"model": untied(get_model_state_dict(bare), model)}
    dcp.load(shards, storage_reader=dcp.FileSystemReader(str(directory)))
    weights = retied(shards["model"], model)
    if optimizer is not None:
        set_state_dict(bare, optimizer, model_state_dict=weights, optim_state_dict=shards["optim"])
    else:
        set_model_state_dict(bare, weights)
    if best_directory is None:
        return None
    best = {"best": untied(copy_weights(model), model)}  # filled in place
    dcp.load(best, storage_reader=dcp.FileSystemReader(str(best_directory)))
    return retied(best["best"], model)


def read_strategy_shards(strategy_state: dict[str, Any], directory: Path, model: torch.nn.Module) -> dict[str, Any]:
    """``strategy_state`` (as ``state.pt`` holds it) with its DTensor placeholders filled from ``directory``,
    sharded like the model's parameters (plain tensors if the model is not sharded)."""
    templates: dict[str, Any] = {}
    state = _fill(strategy_state, templates, model)
    if templates:
        import torch.distributed.checkpoint as dcp

        dcp.load({"strategy": templates}, storage_reader=dcp.FileSystemReader(str(directory)))
    return state


def _fill(obj: Any, templates: dict[str, Any], model: torch.nn.Module) -> Any:
    if isinstance(obj, dict) and "__dcp__" in obj:
        templates[obj["__dcp__"]] = _empty_like_saved(obj, model)
        return templates[obj["__dcp__"]]
    if isinstance(obj, dict):
        return {k: _fill(v, templates, model) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, templates, model) for v in obj)
    return obj


def _empty_like_saved(meta: dict[str, Any], model: torch.nn.Module) -> torch.Tensor:
    """An empty tensor for a saved DTensor: a DTensor on the mesh of the model's sharded parameters."""
    dtype = getattr(torch, meta["dtype"])
    sharded = next((p for p in unwrap(model).parameters() if hasattr(p, "device_mesh")), None)
    if sharded is None:
        return torch.empty(meta["shape"], dtype=dtype)
    from torch.distributed.tensor import Replicate, Shard, empty

    placements = [Shard(int(code[1:])) if code.startswith("S") else Replicate() for code in meta["placements"]]
    return empty(*meta["shape"], dtype=dtype, device_mesh=sharded.device_mesh, placements=placements)
