"""Strategies are found from their classes: conf/strategy, the registry and each class's Config agree (the Config
is the source of every default; the YAML documents each option); a plugin package (an entry point) and a
`strategy._target_` add a strategy without touching cl-runner, with its own facts (``supports``); a composite runs
every hook of every part."""

from __future__ import annotations

import inspect
import json
import os
import re
from types import SimpleNamespace

import pytest
from helpers import REPO, cl_run, make_config, run_quietly
from omegaconf import OmegaConf

from cl_runner.core.errors import ConfigError
from cl_runner.models.kinds import CAUSAL_LM
from cl_runner.strategies import Composite, Strategy, strategy_class
from cl_runner.strategies.registry import builtin_strategies

CONF_STRATEGIES = REPO / "conf" / "strategy"
HOOKS = sorted(n for n, f in vars(Strategy).items()  # option: a helper the hooks use, not a hook
                if inspect.isfunction(f) and not n.startswith("_") and n != "option")

PLUGIN = '''
from dataclasses import dataclass

from cl_runner.strategies.base import Strategy, StrategyConfig
from cl_runner.strategies.support import Refused, Supports


@dataclass
class ShrinkConfig(StrategyConfig):
    name: str = "shrink"
    factor: float = 0.5

    def errors(self, key):
        return [] if self.factor > 0 else [f"{key}.factor: expected a positive number, got {self.factor!r}"]


class Shrink(Strategy):
    """Scales every loss by `factor` (a strategy nobody would use: it only has to be visible in the results)."""

    name = "shrink"
    Config = ShrinkConfig
    supports = Supports(pack=Refused("it only shrinks unpacked batches"), per_task_options=("factor",))

    def loss(self, ctx, batch, outputs, loss):
        factor = self.option(ctx, "factor")
        ctx.log(factor_in_use=factor, shrunk_loss=loss.detach() * factor)
        return loss * factor

    def accounting(self):
        return {"factor": self.cfg.factor}
'''


# (strategy, option) whose conf/strategy value deliberately differs from its Config default; its YAML line says why
# in a comment that contains "differs from the Config default". None today: the Config is the source.
YAML_DIFFERS: set[tuple[str, str]] = set()


def test_conf_files_and_registry_name_the_same_strategies():
    assert {p.stem for p in CONF_STRATEGIES.glob("*.yaml")} == set(builtin_strategies())


def yaml_lines(name: str) -> dict[str, str]:
    """conf/strategy/<name>.yaml's top-level keys -> their line."""
    lines = (CONF_STRATEGIES / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
    return {line.split(":")[0]: line for line in lines if re.match(r"^[a-z_]+:", line)}


@pytest.mark.parametrize("name", sorted(builtin_strategies()))
def test_each_yaml_documents_exactly_its_class_options_with_the_class_defaults(name):
    cls = strategy_class(name)
    own = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF_STRATEGIES / f"{name}.yaml")).items()
           if k != "defaults"}
    defaults = {k: v for k, v in vars(cls.Config()).items() if k != "_target_"}
    assert own.keys() == defaults.keys()
    differs = {k for k in own if own[k] != defaults[k]}
    assert differs == {k for n, k in YAML_DIFFERS if n == name}, f"{name}: YAML values that are not the defaults"
    lines = yaml_lines(name)
    assert all("differs from the Config default" in lines[k] for k in differs)
    assert type(make_config(f"strategy={name}").strategy) is cls.Config


@pytest.mark.parametrize("name", sorted(builtin_strategies()))
def test_each_option_in_a_yaml_says_what_it_is_in_a_comment(name):
    undocumented = [k for k, line in yaml_lines(name).items()
                    if k not in ("defaults", "name") and not re.search(r"\s#\s*\S", line)]
    assert not undocumented, f"conf/strategy/{name}.yaml: no comment on {', '.join(undocumented)}"


def test_composite_forwards_every_hook_to_every_part():
    missing = [hook for hook in HOOKS if hook not in vars(Composite)]
    assert not missing, f"Composite does not forward {missing}"

    calls = []

    class Part(Strategy):
        def __getattribute__(self, attr):
            value = object.__getattribute__(self, attr)
            if attr in HOOKS and callable(value):
                calls.append((id(self), attr))
            return value

    parts = [Part(), Part()]
    composite = Composite(None, parts)
    ctx = SimpleNamespace(task_index=0, model=None, kind=CAUSAL_LM)  # what the base hooks read
    special = {"train_batches": lambda: list(composite.train_batches(ctx, [[]])),
               "load_state_dict": lambda: composite.load_state_dict(composite.state_dict())}
    for hook in HOOKS:
        if hook in special:
            special[hook]()
        else:
            arity = len(inspect.signature(getattr(Strategy, hook)).parameters) - 1
            getattr(composite, hook)(*([ctx] + [None] * (arity - 1) if arity else []))
    for hook in HOOKS:
        assert {(id(p), hook) for p in parts} <= set(calls), hook


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed plugin package as pip leaves one: a module and a dist-info with an entry point."""
    site = tmp_path / "site"
    (site / "shrink_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "shrink_plugin.py").write_text(PLUGIN)
    (site / "shrink_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: shrink-plugin\n"
                                                                    "Version: 0.1\n")
    (site / "shrink_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[cl_runner.strategies]\nshrink = shrink_plugin:Shrink\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return site


@pytest.mark.slow
def test_a_plugin_strategy_runs_through_cl_run(tmp_path, plugin):
    out = tmp_path / "run"
    done = cl_run("strategy=shrink", "strategy.factor=0.25", "device=cpu", "train.epochs=2",
                  "+tasks.tasks.1.strategy_overrides.shrink.factor=0.5", f"hydra.run.dir={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "shrink" and metrics["strategy_accounting"] == {"factor": 0.25}
    assert metrics["config"]["strategy"]["factor"] == 0.25
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(records) == 6 and [r["extras"]["factor_in_use"] for r in records] == [0.25, 0.25, 0.5, 0.5, 0.25, 0.25]
    assert all(0 < r["extras"]["shrunk_loss"] < 10 for r in records)

    packed = cl_run("strategy=shrink", "train.pack=true", "device=cpu", f"hydra.run.dir={tmp_path / 'packed'}",
                    cwd=tmp_path)  # the plugin's class declares that it cannot run packed
    assert packed.returncode == 2 and packed.stderr.strip().splitlines() == [
        "cl-run: error: train.pack: not supported with strategy.name=shrink (it only shrinks unpacked batches); "
        "set train.pack=false"]
    assert not (tmp_path / "packed").exists()

    bad = cl_run("strategy=shrink", "strategy.factor=-1", "device=cpu", f"hydra.run.dir={tmp_path / 'bad'}",
                 cwd=tmp_path)
    assert bad.returncode == 2 and "strategy.factor: expected a positive number" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_target_class_declares_what_it_supports_and_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "my_facts_strategies.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    target = ("strategy._target_=my_facts_strategies.Shrink", "strategy.name=shrink")
    with pytest.raises(ConfigError) as refused:
        make_config(*target, "train.pack=true")
    assert str(refused.value) == ("train.pack: not supported with strategy.name=shrink (it only shrinks unpacked "
                                  "batches); set train.pack=false")
    assert make_config(*target, "train.pack=false").strategy.factor == 0.5


@pytest.mark.slow
def test_a_target_class_is_a_strategy_without_any_registration(tmp_path, monkeypatch):
    (tmp_path / "my_strategies.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)  # the launch directory is importable, as for cl-run started there
    cfg = make_config("strategy._target_=my_strategies.Shrink", "strategy.name=shrink", "+strategy.factor=0.5",
                      "train.epochs=1")
    assert type(cfg.strategy).__name__ == "ShrinkConfig" and cfg.strategy.factor == 0.5
    result = run_quietly(cfg, tmp_path / "run")
    assert result["strategy"] == "shrink" and result["strategy_accounting"] == {"factor": 0.5}
    with pytest.raises(ConfigError, match=r"strategy\._target_: cannot import 'my_strategies\.Nope'"):
        make_config("strategy._target_=my_strategies.Nope")
    with pytest.raises(ConfigError, match=r"strategy\.bogus: unknown key"):
        make_config("strategy._target_=my_strategies.Shrink", "+strategy.bogus=1")


def test_an_unknown_strategy_lists_the_known_ones():
    known = r"adapters, agem, .*, replay, shared_lora, si"
    with pytest.raises(ConfigError, match=rf"strategy.name: expected one of {known}, got 'nope'"):
        strategy_class("nope")


@pytest.mark.slow
def test_plugin_with_a_wrong_entry_point_says_which(tmp_path, plugin, monkeypatch):
    (plugin / "shrink_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[cl_runner.strategies]\nshrink = shrink_plugin:Missing\n")
    done = cl_run("strategy=naive", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    assert "entry point shrink = shrink_plugin:Missing (group cl_runner.strategies): cannot be imported" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_example_of_the_docs_runs_as_written(tmp_path, monkeypatch):
    text = (REPO / "docs" / "extending.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S)
                   if block.startswith("# my_strategies.py"))
    (tmp_path / "docs_example_strategies.py").write_text(example)  # a module name no other test imports
    monkeypatch.chdir(tmp_path)
    cfg = make_config("strategy._target_=docs_example_strategies.WeightNoise", "strategy.name=weight_noise",
                      "+strategy.std=1e-4", "train.epochs=1")
    result = run_quietly(cfg, tmp_path / "run")
    assert result["status"] == "completed" and result["config"]["strategy"]["std"] == 1e-4
    records = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [r["extras"]["noise_std"] for r in records] == [1e-4] * 3
