"""From a composed config to the typed, checked ``Config`` a run uses: the chosen strategy's own Config bound
(``validate``), keys that a ``+key=value`` override slipped past the schema refused, every range checked, all
errors in one ConfigError; and the schemas registered in Hydra's ConfigStore (``register_configs``)."""

from __future__ import annotations

import difflib
import re
from dataclasses import fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf, ValidationError
from omegaconf.errors import ConfigKeyError

from cl_runner.config import schema as schema_module
from cl_runner.config.schema import Config, MonitorConfig
from cl_runner.core.errors import ConfigError


def register_configs() -> None:
    """The root schema, every strategy's schema (``schema/strategy/<name>``, which conf/strategy files extend),
    and a ``strategy/<name>`` option for each plugin strategy (an installed package has no file in conf/)."""
    from cl_runner.strategies.registry import builtin_strategies, plugin_strategies

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for name, cls in builtin_strategies().items():
        cs.store(group="schema/strategy", name=name, node=cls.Config, package="strategy")
    for name, cls in plugin_strategies().items():
        cs.store(group="schema/strategy", name=name, node=cls.Config, package="strategy")
        cs.store(group="strategy", name=name, node=cls.Config)


def unknown_key(full_key: str, schema: Any) -> str:
    """The error of an unknown key: ``train.epoch: unknown key; did you mean train.epochs? (see ...)``, the
    suggestion being the option of ``schema`` (the dataclass that lacks the key; None: no suggestion) nearest its
    last part (difflib)."""
    name = full_key.rsplit(".", 1)[-1]
    known = [f.name for f in fields(schema)] if isinstance(schema, type) and is_dataclass(schema) else []
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {full_key[: len(full_key) - len(name)]}{near[0]}?" if near else ""
    return f"{full_key}: unknown key{hint} (see docs/configuration.md)"


def _unknown_keys(node: Any, schema: type, prefix: str) -> list[str]:
    """Errors of the keys a ``+key=value`` override added that the schema does not define (Hydra lets ``+`` bypass
    it)."""
    if not isinstance(node, DictConfig):
        return []
    known = {f.name: f for f in fields(schema)}
    out = []
    for key in node.keys():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            out.append(unknown_key(path, schema))
            continue
        sub = known[key].type
        items = isinstance(sub, str) and re.fullmatch(r"list\[(\w+)\]", sub)  # tasks.tasks: list[TaskConfig]
        sub = vars(schema_module).get(items.group(1) if items else sub, None) if isinstance(sub, str) else sub
        if not (isinstance(sub, type) and is_dataclass(sub)) or key == "strategy":
            continue
        if items and isinstance(node[key], ListConfig):
            out += [e for i, item in enumerate(node[key]) for e in _unknown_keys(item, sub, f"{path}.{i}")]
        elif not items:
            out += _unknown_keys(node[key], sub, path)
    return out


def _typed_strategy(schema: type, node: DictConfig) -> Any:
    """``node``'s values in the strategy's own Config; a value of the wrong type names its key."""
    return _typed(schema, node, "strategy")


def _typed(schema: type, node: Any, key: str) -> Any:
    """``node``'s values in ``schema``; an unknown key or a value of the wrong type names its key."""
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{key}: expected a mapping of options (e.g. {{lm_eval: mmlu}}), got {node!r}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node)))
    except ConfigKeyError as exc:
        raise ConfigError(unknown_key(f"{key}.{exc.full_key or exc.key}", exc.object_type)) from None
    except ValidationError as exc:
        detail = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{key}.{exc.full_key or exc.key}: {detail}") from None


def validate(cfg: DictConfig) -> Config:
    """Turn a composed config into typed objects and check every range; raise one ConfigError listing all."""
    from cl_runner.strategies.registry import strategy_class

    deleted = [f.name for f in fields(Config) if f.name not in cfg.keys()]
    if deleted:  # ``~train``: to_object below would fill in the schema's defaults, and run them unasked
        raise ConfigError("; ".join(f"{key}: cannot be deleted (~{key}); every run needs it, change its values instead"
                                    for key in deleted))
    schema = strategy_class(OmegaConf.select(cfg, "strategy.name"), OmegaConf.select(cfg, "strategy._target_")).Config
    unknown = _unknown_keys(cfg, Config, "") + _unknown_keys(cfg.strategy, schema, "strategy")
    if unknown:
        raise ConfigError("; ".join(unknown))
    config = OmegaConf.to_object(cfg)
    config.tasks.monitor = {name: _typed(MonitorConfig, node, f"tasks.monitor.{name}")
                            for name, node in (cfg.tasks.monitor or {}).items()}
    if not isinstance(config.strategy, schema):  # composed without the schema (a _target_, a saved config)
        config.strategy = _typed_strategy(schema, cfg.strategy)
    errors = config.errors()
    if errors:
        raise ConfigError("; ".join(errors))
    return config
