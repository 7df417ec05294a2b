"""Per-task epochs and strategy options (tasks.tasks.<i>.epochs, tasks[.tasks.<i>].strategy_overrides): checked
against the strategy's Config (and the per-task options its class declares) before anything loads; the sequence's
applied to the strategy's Config, a task's passed to the strategy as values before that task (``ctx.options``);
exact across a resume."""

from __future__ import annotations

import json
import random

import pytest
from helpers import cl_run, make_config, run_quietly
from resume_runs import kill_and_resume, outcome, reference

from cl_runner.config.task_overrides import strategy_config, task_options
from cl_runner.core.errors import ConfigError
from cl_runner.strategies.adapters import Adapters, AdaptersConfig


def test_the_task_beats_the_sequence_which_beats_strategy_options_and_other_strategies_are_untouched():
    base = AdaptersConfig(orthogonal_lambda=0.1, rank=4)
    sequence = {"adapters": {"orthogonal_lambda": 0.5, "rank": 8}, "ewc": {"ewc_lambda": 3.0}}
    cfg = strategy_config(base, sequence, {"adapters": {"orthogonal_lambda": 5.0}})
    assert (cfg.orthogonal_lambda, cfg.rank, base.orthogonal_lambda) == (5.0, 8, 0.1)
    assert strategy_config(base, sequence).orthogonal_lambda == 0.5
    assert strategy_config(base, {"ewc": {"ewc_lambda": 3.0}}) is base
    task = {"adapters": {"orthogonal_lambda": 5.0}, "lamol": {"lm_lambda": 1.0}}
    assert task_options(base, task) == {"orthogonal_lambda": 5.0} and task_options(base, {}) == {}


@pytest.mark.parametrize(("override", "expected"), [
    ("tasks.tasks.1.epochs=0", "tasks.tasks.1.epochs:"),
    ("+tasks.tasks.0.strategy_overrides.adapters.orthogonal_lambda=-1",
     "tasks.tasks.0.strategy_overrides.adapters.orthogonal_lambda:"),
    ("+tasks.tasks.0.strategy_overrides.adapters.rank=4",  # structural: once per run, not per task
     "tasks.tasks.0.strategy_overrides.adapters.rank: expected an option of adapters that can be set per task"),
    ("+tasks.tasks.0.strategy_overrides.adapters.l2_lambda=0.1",
     "tasks.tasks.0.strategy_overrides.adapters.l2_lambda:"),
    ("+tasks.strategy_overrides.adapters.rnak=4", "tasks.strategy_overrides.adapters.rnak: expected an option"),
    ("+tasks.strategy_overrides.adapterz.rank=4", "tasks.strategy_overrides.adapterz: expected a strategy name"),
    ("+tasks.strategy_overrides.adapters.rank=many", "tasks.strategy_overrides.adapters.rank:"),
])
def test_bad_overrides_name_their_key(override, expected):
    with pytest.raises(ConfigError) as err:
        make_config(override)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_bad_override_is_one_line_exit_2_before_anything_runs(tmp_path):
    key = "tasks.tasks.2.strategy_overrides.ewc.ewc_lambda"
    result = cl_run("device=cpu", f"hydra.run.dir={tmp_path / 'run'}", f"+{key}=1", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"cl-run: error: {key}: expected an option of ewc that can be set per task (none)\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_each_task_trains_its_own_epochs_with_its_own_lambda(tmp_path, monkeypatch):
    seen = []  # (the task's value, the strategy's Config value) when each task starts
    before = Adapters.before_task
    monkeypatch.setattr(Adapters, "before_task", lambda self, ctx: (
        seen.append((self.option(ctx, "orthogonal_lambda"), self.cfg.orthogonal_lambda)), before(self, ctx))[1])
    cfg = make_config("strategy=adapters", "train.epochs=1", "train.keep_best=false", "tasks.tasks.1.epochs=3",
                      "+tasks.strategy_overrides.adapters.orthogonal_lambda=0.5",
                      "+tasks.tasks.2.strategy_overrides.adapters.orthogonal_lambda=5", small=False)
    run_quietly(cfg, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [sum(r["task"] == name for r in history) for name in ("color", "city", "food")] == [1, 3, 1]
    assert seen == [(0.5, 0.5), (0.5, 0.5), (5.0, 0.5)]  # the run's Config is never overwritten


@pytest.mark.slow
def test_sigkill_inside_a_task_with_its_own_epochs_then_resume_is_identical(tmp_path):
    args = ("train.epochs=1", "tasks.tasks.1.epochs=3", "train.keep_best=false")  # city: 3 x 8 steps, ckpt every 5
    expected = reference(tmp_path, *args)
    rng = random.Random(17)
    assert kill_and_resume(tmp_path / "killed", [(rng.randint(2, 3), rng.uniform(0.0, 0.2))], *args) == 1
    assert outcome(tmp_path / "killed") == expected
