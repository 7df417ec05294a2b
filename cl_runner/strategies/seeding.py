"""Seeded initialisation of modules a strategy adds mid-run, leaving the global RNG streams untouched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: the global torch RNG (and the CUDA one of ``device``) seeded with ``seed``; after: as before.

    New modules (an adapter, a column, new embedding rows) are then the same for a given seed and task, and
    adding them draws nothing from the streams that dropout and data order use.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
