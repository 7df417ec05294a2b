"""``cl-run --help``: the config groups with their options, and the config the overrides compose to.

Hydra's own ``--help`` builds a fresh copy of its whole config repository (every stored schema) for each group it
lists, about 110 deep copies here: 2-5 s. This lists the options from the files in ``conf/`` (and the installed
plugin strategies) and composes the config once. ``cl-run --hydra-help`` is still Hydra's.
"""

from __future__ import annotations

from pathlib import Path

INTRO = "cl-run: train a causal LM on a sequence of tasks, one after another, and measure what it forgets."
HIDDEN_GROUPS = ("hydra",)  # Hydra's own groups: cl-run --hydra-help


def group_options(conf_dir: Path) -> dict[str, list[str]]:
    """``{group: [option, ...]}`` of the top-level config groups: the YAML files directly in each folder."""
    from cl_runner.strategies.registry import plugin_strategies

    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(conf_dir.iterdir())
              if d.is_dir() and d.name not in HIDDEN_GROUPS}
    groups["strategy"] = sorted({*groups.get("strategy", []), *plugin_strategies()})
    return groups


def help_text(conf_dir: Path, overrides: list[str]) -> str:
    """The help page; the config is composed with ``overrides`` (a bad one raises, as composing does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cl_runner.schema import register_configs

    register_configs()
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    groups = "\n".join(f"{name}: {', '.join(options)}" for name, options in group_options(conf_dir).items())
    return (f"{INTRO}\n\n== Configuration groups ==\nCompose your configuration from those groups (group=option)\n\n"
            f"{groups}\n\n== Config ==\nOverride anything in the config (foo.bar=value; every key is in "
            f"docs/configuration.md)\n\n{OmegaConf.to_yaml(cfg)}\n"
            "Multirun (-m), sweepers and launchers: cl-run --hydra-help, and docs/sweeps.md")
