"""Strategy options a task sequence sets: for the whole sequence (``tasks.strategy_overrides``) or for one task
(``tasks.tasks.<i>.strategy_overrides``), each keyed by the strategy it applies to, e.g.
``{adapters: {orthogonal_lambda: 5}}``; ignored when another strategy runs, so a published sequence can carry
its method's settings and still run every baseline. The sequence's apply to the strategy's own Config once,
before the strategy is built (``strategy_config``); a task's are passed to the strategy as values before that task
trains (``task_options`` -> ``Context.options``, read by ``Strategy.option``), and only the options its class
declares per task (``supports.per_task_options``) may be set so. Values are checked here, against the strategy's
Config, before anything loads."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from omegaconf import OmegaConf, ValidationError


def override_errors(overrides: dict[str, dict[str, Any]], key: str, per_task: bool) -> list[str]:
    """Problems of one ``strategy_overrides`` block: unknown strategies, unknown or (per task) once-per-run
    options, values of the wrong type or range; each names its key."""
    from cl_runner.strategies.registry import strategy_classes

    classes, errs = strategy_classes(), []
    for name, options in overrides.items():
        where = f"{key}.{name}"
        if name not in classes:
            errs.append(f"{where}: expected a strategy name ({', '.join(sorted(classes))})")
            continue
        schema = classes[name].Config
        allowed = classes[name].supports.per_task_options if per_task else tuple(
            f for f in schema.__dataclass_fields__ if f != "name")
        unknown = [f"{where}.{option}: expected an option of {name} that can be set "
                   f"{'per task' if per_task else 'here'} ({', '.join(allowed) or 'none'})"
                   for option in options if option not in allowed]
        errs += unknown or _value_errors(schema, name, dict(options), where)
    return errs


def _value_errors(schema: type, name: str, options: dict[str, Any], where: str) -> list[str]:
    try:
        merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema(name=name)), options))
    except ValidationError as exc:
        return [f"{where}.{exc.key}: {str(exc).strip().splitlines()[0]}"]
    return merged.errors(where).copy() if hasattr(merged, "errors") else []


def apply(cfg: Any, overrides: dict[str, dict[str, Any]]) -> Any:
    """``cfg`` (a strategy's Config) with the options ``overrides`` sets for its strategy; ``cfg`` unchanged."""
    options = overrides.get(cfg.name) or {}
    return replace(cfg, **options) if options else cfg


def strategy_config(base: Any, sequence: dict[str, dict[str, Any]], task: dict[str, dict[str, Any]] | None = None
                    ) -> Any:
    """The strategy's Config for one task: ``base`` (strategy.*), then the sequence's, then the task's values
    (without ``task``: the run's Config, which the strategy is built with)."""
    return apply(apply(base, sequence), task or {})


def task_options(cfg: Any, task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The options one task sets for the running strategy (``cfg``: its Config), as ``Context.options`` holds them."""
    return dict(task.get(cfg.name) or {})


def task_configs(base: Any, tasks: Any) -> list[Any]:
    """Every task's strategy Config (``tasks``: the TasksConfig), e.g. to check each against a distributed kind."""
    return [strategy_config(base, tasks.strategy_overrides, t.strategy_overrides) for t in tasks.tasks]
