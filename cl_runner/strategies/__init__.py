"""Continual-learning strategies: the hook interface (``base.py``), composition (``compose.py``), one module per
strategy family, and the registry that finds them (``registry.py``).

May import: core, models and tasks; never config (``config.schema`` imports the registry, which imports every
strategy), scoring or the engine (the loop calls the strategies' hooks)."""

from cl_runner.strategies.base import Context, Strategy, StrategyConfig
from cl_runner.strategies.compose import Composite
from cl_runner.strategies.registry import build_strategy, strategy_class, strategy_classes

__all__ = ["Context", "Composite", "Strategy", "StrategyConfig", "build_strategy", "strategy_class",
           "strategy_classes"]
