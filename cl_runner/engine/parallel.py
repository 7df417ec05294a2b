"""The model across processes: FSDP2 sharding (``fully_shard``) once, after loading, and the DDP wrapper the loop
trains through (made anew for each task, since strategies change which parameters train between tasks).

FSDP2 keeps parameter names (its parameters are DTensors holding this rank's shard), so strategies, checkpoints and
evaluation address the sharded model exactly as the plain one; DDP's wrapper is used for the training forward
only, and everything else (strategies, evaluation, checkpoints) sees the bare module with its own names."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from cl_runner.config.schema import DistributedConfig
from cl_runner.core.dist import World

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class the model names in ``_no_split_modules`` (Hugging Face
    sets it: GPT2Block, LlamaDecoderLayer, ...), else the entries of its longest ``ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: torch.nn.Module, cfg: DistributedConfig) -> torch.nn.Module:
    """``fully_shard`` every transformer block (``wrap: block``) and then the whole model, in place."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {
        "reshard_after_forward": cfg.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=DTYPES.get(cfg.param_dtype), reduce_dtype=DTYPES.get(
            cfg.reduce_dtype)),
        "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    }
    for block in transformer_blocks(model) if cfg.wrap == "block" else []:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def train_module(model: torch.nn.Module, world: World, cfg: DistributedConfig,
                 device: torch.device) -> torch.nn.Module:
    """What the loop runs the training forward through: a DDP wrapper over ``model`` (ddp), else ``model``."""
    if world.kind != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=cfg.find_unused_parameters,
                                   gradient_as_bucket_view=True)  # no second copy of the gradients (4 B/param)


def gradient_sync(module: torch.nn.Module, last: bool):
    """A context for one micro-batch's backward: gradients are reduced across ranks only on the step's last
    micro-batch (DDP's ``no_sync``; FSDP2's ``set_requires_gradient_sync``)."""
    if hasattr(module, "no_sync"):
        return nullcontext() if last else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        return _fsdp_sync(module, last)
    return nullcontext()


@contextmanager
def _fsdp_sync(module: torch.nn.Module, last: bool):
    module.set_requires_gradient_sync(last)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
