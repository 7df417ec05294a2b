"""Strategies are found from their classes: conf/strategy, the registry and each class's Config agree; a plugin
package (an entry point) and a `strategy._target_` add a strategy without touching cl-runner; a composite runs
every hook of every part."""

from __future__ import annotations

import inspect
import json
import re
from types import SimpleNamespace

import pytest
from helpers import REPO, cl_run, make_config, run_quietly
from omegaconf import OmegaConf

from cl_runner.core.errors import ConfigError
from cl_runner.strategies import Composite, Strategy, strategy_class
from cl_runner.strategies.registry import builtin_strategies

CONF_STRATEGIES = REPO / "conf" / "strategy"
HOOKS = sorted(n for n, f in vars(Strategy).items() if inspect.isfunction(f) and not n.startswith("_"))

PLUGIN = '''
from dataclasses import dataclass

from cl_runner.strategies.base import Strategy, StrategyConfig


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

    def loss(self, ctx, batch, outputs, loss):
        ctx.log(factor_in_use=self.cfg.factor, shrunk_loss=loss.detach() * self.cfg.factor)
        return loss * self.cfg.factor

    def accounting(self):
        return {"factor": self.cfg.factor}
'''


def test_conf_files_and_registry_name_the_same_strategies():
    assert {p.stem for p in CONF_STRATEGIES.glob("*.yaml")} == set(builtin_strategies())


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF_STRATEGIES.glob("*.yaml")))
def test_each_yaml_documents_exactly_its_class_options_with_the_class_defaults(name):
    cls = strategy_class(name)
    own = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF_STRATEGIES / f"{name}.yaml")).items()
           if k != "defaults"}
    defaults = {k: v for k, v in vars(cls.Config()).items() if k != "_target_"}
    assert own == defaults
    assert type(make_config(f"strategy={name}").strategy) is cls.Config


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
    ctx = SimpleNamespace(task_index=0)  # what the base hooks read
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
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


@pytest.mark.slow
def test_a_plugin_strategy_runs_through_cl_run(tmp_path, plugin):
    out = tmp_path / "run"
    done = cl_run("strategy=shrink", "strategy.factor=0.25", "device=cpu", "train.epochs=2",
                  f"hydra.run.dir={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "shrink" and metrics["strategy_accounting"] == {"factor": 0.25}
    assert metrics["config"]["strategy"]["factor"] == 0.25
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["extras"]["factor_in_use"] == 0.25 for r in records)
    assert all(0 < r["extras"]["shrunk_loss"] < 10 for r in records)

    bad = cl_run("strategy=shrink", "strategy.factor=-1", "device=cpu", f"hydra.run.dir={tmp_path / 'bad'}",
                 cwd=tmp_path)
    assert bad.returncode == 2 and "strategy.factor: expected a positive number" in bad.stderr
    assert not (tmp_path / "bad").exists()


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
