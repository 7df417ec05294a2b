"""``cl-run --help``: the config groups with their options, and the config the overrides compose to.

Hydra's own ``--help`` (and its config loader's ``get_group_options``) builds a fresh copy of its whole config
repository (every stored schema) for each group it lists, about 110 deep copies here: 2-5 s. This lists the options
from the files in the directories of the search path a run uses (conf/ and the user's config directories:
cl_runner/config/preflight.py) and the installed plugin strategies, and composes the config once.
``cl-run --hydra-help`` is still Hydra's.
"""

from __future__ import annotations

from pathlib import Path

INTRO = "cl-run: train a causal LM on a sequence of tasks, one after another, and measure what it forgets."
HIDDEN_GROUPS = ("hydra",)  # Hydra's own groups: cl-run --hydra-help


def config_roots(overrides: list[str]) -> list:
    """cl-run's conf/ and the directories of the ``hydra.searchpath`` override, as directories to list
    (``pkg://`` entries as the package's resources)."""
    from importlib.resources import files

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_runner.config.preflight import CONF_DIR, SEARCHPATH

    entries = [e for o in overrides if o.split("=", 1)[0] == SEARCHPATH
               for e in OverridesParser.create().parse_override(o).value()]
    return [CONF_DIR, *(files(e[len("pkg://"):]) if e.startswith("pkg://") else Path(e.removeprefix("file://"))
                        for e in entries)]


def group_options(overrides: list[str]) -> dict[str, list[str]]:
    """``{group: [option, ...]}`` of the top-level config groups over the search path ``overrides`` set: the YAML
    files directly in each folder of each config directory, and the installed plugin strategies."""
    from cl_runner.strategies.registry import plugin_strategies

    found: dict[str, set[str]] = {}
    for root in config_roots(overrides):
        for group in (d for d in root.iterdir() if d.is_dir() and d.name not in HIDDEN_GROUPS):
            found.setdefault(group.name, set()).update(f.name[:-5] for f in group.iterdir() if f.name.endswith(".yaml"))
    found.setdefault("strategy", set()).update(plugin_strategies())
    return {group: sorted(found[group]) for group in sorted(found)}


def help_text(overrides: list[str]) -> str:
    """The help page; the config is composed with ``overrides`` (a bad one raises, as composing does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cl_runner.config.preflight import CONF_DIR
    from cl_runner.config.validate import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    groups = "\n".join(f"{name}: {', '.join(names)}" for name, names in group_options(overrides).items())
    return (f"{INTRO}\n\n== Configuration groups ==\nCompose your configuration from those groups (group=option)\n\n"
            f"{groups}\n\n== Config ==\nOverride anything in the config (foo.bar=value; every key is in "
            f"docs/configuration.md)\n\n{OmegaConf.to_yaml(cfg)}\n"
            "Multirun (-m), sweepers and launchers: cl-run --hydra-help, and docs/sweeps.md\n"
            "Your own configs: --config-dir DIR, ./cl-conf or $CL_RUNNER_CONFIG_PATH (docs/own_configs.md)")
