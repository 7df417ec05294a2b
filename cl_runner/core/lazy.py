"""Deferred imports: torch takes a second or more to import, and ``cl-run --help`` or a config error never needs it.

``defer("torch")`` (called when the ``cl_runner`` package is imported) puts a stand-in for torch in ``sys.modules``:
every ``import torch`` gets that module object, and torch's own code runs in it at the first read of an attribute
it does not have yet (``torch.zeros``, ``torch.nn``). Modules keep the usual ``import torch`` at the top and stay
cheap to import as long as they read no torch attribute at import time: annotations are free (every module has
``from __future__ import annotations``), ``@no_grad`` from here replaces ``@torch.no_grad()``, and a module the
strategy registry imports has no ``import torch.x`` / ``from torch.x import y`` / ``class M(nn.Module)`` at its
top (tests/cli/test_startup.py fails when a bad-input error imports torch).

Like the standard library's ``importlib.util.LazyLoader``, but the stand-in answers ``__spec__`` without loading
(every ``import torch`` statement reads it, which makes LazyLoader load at the second import), and
``AlreadyImported`` covers a submodule import (``import torch.nn``) while torch is unloaded: reading the package's
``__path__`` loads torch, which imports the submodule itself; the import machinery then gets that module instead
of executing a second copy.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Deferred(types.ModuleType):
    """A module whose code has not run yet: the first read of a missing attribute runs it, in this object."""

    def __getattr__(self, attr: str) -> Any:
        spec = self.__spec__
        self.__class__ = types.ModuleType  # from here on a plain module, also while its code runs
        if spec.submodule_search_locations is not None:
            self.__path__ = spec.submodule_search_locations  # hidden while deferred (see ``defer``)
        try:
            spec.loader.exec_module(self)
        except BaseException:
            del sys.modules[spec.name]  # the next import tries again, and fails where it always did
            raise
        return getattr(self, attr)


class AlreadyImported(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a submodule of a deferred package that loading the package has just imported."""

    def __init__(self) -> None:
        self.packages: set[str] = set()

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if target is not None or name not in sys.modules or name.partition(".")[0] not in self.packages:
            return None  # a reload (target set), a module not imported yet, or not ours: the usual finders
        spec = importlib.machinery.ModuleSpec(name, self, is_package=hasattr(sys.modules[name], "__path__"))
        spec.loader_state = sys.modules[name].__spec__
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return sys.modules[spec.name]

    def exec_module(self, module: Any) -> None:
        module.__spec__ = module.__spec__.loader_state  # undo what module_from_spec set: the module is unchanged


ALREADY_IMPORTED = AlreadyImported()


def defer(name: str) -> None:
    """Import the top-level package ``name`` at its first use (see above). A no-op when it is already imported
    or not installed (then the first ``import`` fails where it always did)."""
    if name in sys.modules or "." in name:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    if hasattr(module, "__path__"):
        del module.__path__  # a submodule import must load the package first (and meet ALREADY_IMPORTED)
    module.__class__ = Deferred
    sys.modules[name] = module
    ALREADY_IMPORTED.packages.add(name)
    if ALREADY_IMPORTED not in sys.meta_path:
        sys.meta_path.insert(0, ALREADY_IMPORTED)


def is_loaded(name: str) -> bool:
    """Whether module ``name`` has really been imported (not just deferred)."""
    return name in sys.modules and type(sys.modules[name]) is not Deferred  # type(): isinstance would load it


def no_grad(fn: F) -> F:
    """``@torch.no_grad()`` that reads torch when ``fn`` is called, not when it is defined."""

    @functools.wraps(fn)
    def without_grad(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return without_grad  # type: ignore[return-value]
