"""Capture and restore every random number generator a run draws from (Python, NumPy, torch, CUDA): what a
checkpoint stores so that a resume continues exactly, and what a monitor saves around its own sampling."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from cl_runner.core import dist


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng(saved: Any) -> dict[str, Any]:
    """This rank's RNG state from a checkpoint: its own when the process count is the one that wrote it, else
    rank 0's (a single-process checkpoint holds one state, a distributed one a list in rank order)."""
    if isinstance(saved, dict):
        return saved
    world = dist.world()
    return saved[world.rank] if len(saved) == world.size else saved[0]
