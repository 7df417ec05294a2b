"""What a strategy can run with: the facts its class declares where it is written (``supports = Supports(...)``),
and the one place that checks them, against the config before anything loads (``support_errors``, called by the
config validation and by ``registry.build_strategy``) and against the loaded model (``refuse_model``, called by
``Strategy.check``: a hub model whose kind the config could not tell).

The settings a strategy may refuse are ``train.pack`` (``pack``), an encoder-decoder model (``encoder_decoder``)
and each ``distributed.kind`` (``ddp``, ``fsdp``); a refusal is a ``Refused`` with the reason the user reads.
``per_task_options`` are the options a task of the sequence may set for itself (``tasks.tasks.<i>.
strategy_overrides``): the strategy reads them per task (``Strategy.option``), not once when built.
A composite strategy combines its parts' facts (``combined``); a subclass adds to its parent's with ``|``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from cl_runner.core.errors import ConfigError

SETTINGS = ("pack", "encoder_decoder", "ddp", "fsdp")


@dataclass(frozen=True)
class Refused:
    """One setting a strategy cannot run with. ``reason``: why (and what to use instead), the end of the one-line
    error. ``option`` and ``when``: refused only for some values of the strategy's options (``when`` gets the
    strategy's Config); an encoder-decoder refusal names ``strategy.<option>`` as its key."""

    reason: str
    option: str = "name"
    when: Callable[[Any], bool] | None = None

    def applies(self, cfg: Any) -> bool:
        return self.when is None or bool(self.when(cfg))


Refusals = tuple[Refused, ...]


@dataclass(frozen=True)
class Supports:
    """The facts of one strategy class: for each setting, nothing (supported) or its refusals; and the options a
    task may set per task. A single ``Refused`` may stand for a tuple of one."""

    pack: Refused | Refusals = ()
    encoder_decoder: Refused | Refusals = ()
    ddp: Refused | Refusals = ()
    fsdp: Refused | Refusals = ()
    per_task_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            value = getattr(self, setting)
            if isinstance(value, Refused):
                object.__setattr__(self, setting, (value,))  # frozen: normalised once, here

    def refusals(self, setting: str, cfg: Any) -> list[Refused]:
        """The refusals of ``setting`` that apply to the options ``cfg``."""
        return [r for r in getattr(self, setting) if r.applies(cfg)]

    def __or__(self, other: Supports) -> Supports:
        """Both facts together: every refusal of either, every per-task option of either."""
        return Supports(**{f.name: tuple(dict.fromkeys((*getattr(self, f.name), *getattr(other, f.name))))
                           for f in fields(Supports)})


def combined(*classes: type) -> Supports:
    """The facts of a strategy made of parts of these classes: what any part refuses, the composite refuses."""
    out = Supports()
    for cls in classes:
        out = out | cls.supports
    return out


def _line(setting: str, refusal: Refused, cfg: Any) -> str:
    name, value = cfg.name, getattr(cfg, refusal.option)
    if setting == "pack":
        return (f"train.pack: not supported with strategy.{refusal.option}={value} ({refusal.reason}); "
                "set train.pack=false")
    if setting == "encoder_decoder":
        return f"strategy.{refusal.option}: {value} is not supported with an encoder-decoder model: {refusal.reason}"
    return f"distributed.kind: strategy {name} cannot run with distributed={setting}: {refusal.reason}"


def support_errors(cls: type, configs: Iterable[Any], *, pack: bool = False, encoder_decoder: bool = False,
                   distributed: str = "none") -> list[str]:
    """One line per refusal of strategy class ``cls`` that applies to any of ``configs`` (its options, e.g. one
    per task with the task's overrides) with these settings; each line once, in the order of the settings."""
    settings = [s for s, on in (("pack", pack), ("encoder_decoder", encoder_decoder),
                                (distributed, distributed in ("ddp", "fsdp"))) if on]
    lines = [_line(s, r, cfg) for s in settings for cfg in configs for r in cls.supports.refusals(s, cfg)]
    return list(dict.fromkeys(lines))


def refuse_model(cls: type, cfg: Any, kind: Any) -> None:
    """Raise the first refusal of ``cls`` (with options ``cfg``) for the loaded model's ``kind``
    (cl_runner/models/kinds.py) as a one-line ConfigError: the safety net for a model whose kind the config check
    could not read (a hub id not in the cache). Imported here: config validation imports this module, and
    kinds.py would import torch (``cl-run --help`` and bad inputs answer without it: tests/cli/test_startup.py)."""
    from cl_runner.models.kinds import EncoderDecoder

    errors = support_errors(cls, [cfg], encoder_decoder=isinstance(kind, EncoderDecoder))
    if errors:
        raise ConfigError(errors[0])
