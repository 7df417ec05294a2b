"""Logging helpers shared by the parts that call chatty libraries (trackers' clients, lm-evaluation-harness)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Logger ``name`` at ``level`` (default ERROR) inside the block, its own level again after."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
