"""Strategy registry: ``strategy.name`` -> the class implementing it (imported on first use)."""

from __future__ import annotations

import importlib
from typing import Any

from cl_runner.strategies.base import Context, Strategy

STRATEGIES: dict[str, str] = {
    "naive": "cl_runner.strategies.naive:Naive",
    "joint": "cl_runner.strategies.joint:Joint",
    "replay": "cl_runner.strategies.replay:Replay",
    "ewc": "cl_runner.strategies.ewc:EWC",
    "l2": "cl_runner.strategies.ewc:L2",
    "lwf": "cl_runner.strategies.lwf:LwF",
    "ewc_replay": "cl_runner.strategies.ewc_replay:EWCReplay",
    "adapters": "cl_runner.strategies.adapters:Adapters",
    "shared_lora": "cl_runner.strategies.adapters:SharedLoRA",
    "progressive": "cl_runner.strategies.progressive:Progressive",
    "mer": "cl_runner.strategies.mer:MER",
    "lamol": "cl_runner.strategies.lamol:LAMOL",
}


def build_strategy(cfg: Any) -> Strategy:
    """Instantiate the strategy named by ``cfg.name`` with its typed config."""
    module_name, class_name = STRATEGIES[cfg.name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(cfg)


__all__ = ["Context", "Strategy", "STRATEGIES", "build_strategy"]
