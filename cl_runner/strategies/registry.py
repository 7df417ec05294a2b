"""Where strategies are found: every module of this package, installed plugins (the entry point group
``cl_runner.strategies``), and a ``strategy._target_`` class path named in a config.

A class is a strategy when it subclasses ``Strategy`` and sets both ``name`` and ``Config`` itself; nothing
else lists strategies (what each supports is on its class too: ``support.py``), so adding one is adding one file
(and its YAML in ``conf/strategy/``), and a plugin package adds one without a fork of cl-runner.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from cl_runner.core.errors import ConfigError
from cl_runner.strategies.base import Strategy
from cl_runner.strategies.support import support_errors

ENTRY_POINT_GROUP = "cl_runner.strategies"
PACKAGE = "cl_runner.strategies"


def is_strategy(obj: Any) -> bool:
    """A class that declares its own ``name`` and ``Config`` (parts such as MER's Reptile declare no Config).
    ``type(obj)``, not ``isinstance(obj, type)``: that reads ``obj.__class__``, which loads a deferred module
    (``import torch`` in a strategy module is deferred: cl_runner/core/lazy.py)."""
    return (issubclass(type(obj), type) and issubclass(obj, Strategy) and obj is not Strategy
            and "name" in obj.__dict__ and "Config" in obj.__dict__)


def _add(found: dict[str, type[Strategy]], cls: type[Strategy], origin: str) -> None:
    if cls.name in found and found[cls.name] is not cls:
        other = found[cls.name]
        raise ConfigError(f"strategy {cls.name!r}: defined twice ({other.__module__}.{other.__qualname__} and "
                          f"{origin}); rename one")
    found[cls.name] = cls


@cache
def builtin_strategies() -> dict[str, type[Strategy]]:
    """The strategies defined in this package's modules, by name."""
    found: dict[str, type[Strategy]] = {}
    package = importlib.import_module(PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{PACKAGE}.{info.name}")
        for obj in vars(module).values():
            if is_strategy(obj) and obj.__module__ == module.__name__:
                _add(found, obj, f"{module.__name__}.{obj.__qualname__}")
    return found


@cache
def plugin_strategies() -> dict[str, type[Strategy]]:
    """Strategies that installed packages declare under the entry point group ``cl_runner.strategies``."""
    found: dict[str, type[Strategy]] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {point.name} = {point.value} (group {ENTRY_POINT_GROUP})"
        try:
            cls = point.load()
        except Exception as exc:
            raise ConfigError(f"{where}: cannot be imported ({type(exc).__name__}: {exc})") from None
        if not is_strategy(cls):
            raise ConfigError(f"{where}: expected a Strategy subclass that sets name and Config")
        if cls.name != point.name or cls.name in builtin_strategies():
            raise ConfigError(f"{where}: its class is named {cls.name!r}; the entry point must use that name, "
                              "and a built-in strategy's name cannot be reused")
        _add(found, cls, where)
    return found


def strategy_classes() -> dict[str, type[Strategy]]:
    """Every strategy ``strategy.name`` may choose: built-in ones, then plugins."""
    return {**builtin_strategies(), **plugin_strategies()}


def target_class(target: str) -> type[Strategy]:
    """The class a ``strategy._target_`` names (``module.Class``; the launch directory is importable too)."""
    module_name, _, class_name = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"strategy._target_: expected module.Class, got {target!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"strategy._target_: cannot import {target!r} ({type(exc).__name__}: {exc})") from None
    if not is_strategy(cls):
        raise ConfigError(f"strategy._target_: {target} is not a Strategy subclass that sets name and Config")
    return cls


def strategy_class(name: str | None, target: str | None = None) -> type[Strategy]:
    """The class of ``strategy.name`` (or of ``strategy._target_`` when set)."""
    if target:
        return target_class(target)
    classes = strategy_classes()
    if name not in classes:
        raise ConfigError(f"strategy.name: expected one of {', '.join(sorted(classes))}, got {name!r}")
    return classes[name]


def build_strategy(cfg: Any) -> Strategy:
    """Instantiate the strategy the config names, with its typed config; refused (``ConfigError``) when it cannot
    run under this process's ``distributed.kind`` (a safety net: the config check refuses it earlier)."""
    from cl_runner.core.dist import world

    cls = strategy_class(cfg.name, getattr(cfg, "_target_", None))
    errors = support_errors(cls, [cfg], distributed=world().kind)
    if errors:
        raise ConfigError(errors[0])
    return cls(cfg)
