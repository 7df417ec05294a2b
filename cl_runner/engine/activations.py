"""Activation checkpointing (``train.activation_checkpointing``): each transformer block keeps only its input for
the backward pass and recomputes its inside there, trading one more forward of the blocks for activation memory
that no longer grows with the number of layers.

Applied once, to the model as loaded and before FSDP shards it (``fully_shard`` then wraps the checkpointed
blocks, its hooks outside the recomputed part). Hugging Face models that support it use their own switch
(``activation_checkpointing_enable``; ``gradient_checkpointing_enable`` in older transformers), with
torch's non-reentrant checkpoint: inputs need not require gradients, so frozen embeddings (adapters, prompt
tuning) and keyword arguments work. Any other model has each block's ``forward`` run under
``torch.utils.checkpoint`` (what torch's ``checkpoint_wrapper`` does, without its wrapper module: parameter names,
which strategies and checkpoints address, stay the same). Recomputation restores the random state, so dropout
draws the same masks: loss and gradients equal those without checkpointing.

Checkpointing acts in training mode with gradients on only: evaluation, generation and the strategies' no-grad
or vmapped passes (``model.eval()``) run the blocks as they are."""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from cl_runner.core.errors import ConfigError
from cl_runner.engine.parallel import transformer_blocks

HF_KWARGS = {"use_reentrant": False}


def enable(model: torch.nn.Module) -> str:
    """Checkpoint every transformer block of ``model`` in place; returns how: ``"transformers"`` (the model's own
    switch) or ``"blocks"`` (each block's forward, for models without one). A model without blocks to
    checkpoint is refused (ConfigError)."""
    if getattr(model, "supports_gradient_checkpointing", False):
        switch = getattr(model, "activation_checkpointing_enable", None)
        if switch is not None:  # transformers >= 5.25; the old name warns there
            switch(activation_checkpointing_kwargs=dict(HF_KWARGS))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(HF_KWARGS))
        return "transformers"
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} has no transformer blocks to "
                          "checkpoint; set it to false")
    for block in blocks:
        # a bound method: a deep copy of the model (LwF's teacher) binds it to the copied block
        block.forward = types.MethodType(_checkpointed_forward, block)
    return "blocks"


def _checkpointed_forward(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, recomputed in backward when training with gradients (instance attribute set by
    ``enable``: ``nn.Module.__call__`` runs its hooks, FSDP's too, outside the recomputed part)."""
    forward = type(block).forward.__get__(block)
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def is_enabled(model: torch.nn.Module) -> bool:
    """Whether ``enable`` (either way) is in effect on ``model``."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else (
        "is_gradient_checkpointing")  # the name before transformers 5.25; it warns there
    if getattr(model, flag, False):
        return True
    return any(getattr(b.forward, "__func__", None) is _checkpointed_forward for b in transformer_blocks(model))
