"""Budgets that fit the sequence: a sequence's training defaults (conf/tasks/budget/<file>.yaml, in its defaults
list) beat conf/config.yaml's; an experiment file and the command line beat the sequence's."""

import pytest
from helpers import REPO, make_config
from omegaconf import OmegaConf

ROOT = OmegaConf.load(REPO / "conf" / "config.yaml")
SEQUENCES = sorted(p.stem for p in (REPO / "conf" / "tasks").glob("*.yaml"))


def budget(sequence: str) -> dict:
    """The budget file a sequence lists in its defaults (``budget/<file>``), as plain data."""
    entries = OmegaConf.load(REPO / "conf" / "tasks" / f"{sequence}.yaml").defaults
    (name,) = [e.split("/", 1)[1] for e in entries if isinstance(e, str) and e.startswith("budget/")]
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "tasks" / "budget" / f"{name}.yaml"))


@pytest.mark.parametrize("sequence", SEQUENCES)
def test_every_sequence_composes_with_its_own_budget(sequence):
    cfg = make_config(f"tasks={sequence}", small=False)
    own = budget(sequence)
    assert "epochs" in own["train"] or "max_steps" in own["train"]
    for group, values in own.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, group), key) == value, f"{group}.{key}"


def test_a_sequence_budget_beats_the_root_config_and_loses_to_the_command_line():
    own = budget("offline_lm_domains")["train"]
    assert own["epochs"] != ROOT.train.epochs  # the sequence really replaces the root default
    assert make_config("tasks=offline_lm_domains", small=False).train.epochs == own["epochs"]
    cfg = make_config("tasks=offline_lm_domains", "train.epochs=2", f"train.lr={own['lr'] * 2}", small=False)
    assert (cfg.train.epochs, cfg.train.lr) == (2, own["lr"] * 2)


def test_an_experiment_file_beats_the_sequence_budget():
    cfg = make_config("experiment=olora_standard_order1", "tasks=offline_lm_domains", small=False)
    assert cfg.tasks.name == "offline_lm_domains"
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.keep_best) == (1, 1.0e-3, False)  # base/olora.yaml


def test_keys_a_budget_does_not_set_keep_the_root_defaults():
    cfg = make_config("tasks=offline_lm_domains", small=False)
    assert "batch_size" not in budget("offline_lm_domains")["train"]
    assert cfg.train.batch_size == ROOT.train.batch_size and cfg.eval.full_every == ROOT.eval.full_every


def test_train_max_examples_caps_every_task_and_a_tasks_own_cap_wins():
    from dataclasses import replace

    from cl_runner.config.schema import TaskConfig, TasksConfig, TrainConfig
    from cl_runner.tasks.load import load_sequence

    facts = [TaskConfig(name=r, source="facts", relation=r, metric="exact_match") for r in ("color", "city", "food")]
    sequence = TasksConfig(name="facts", tasks=[facts[0], replace(facts[1], max_train_examples=20), facts[2]])
    tasks = load_sequence(sequence, 0, None, max_train_examples=10)  # train.max_examples=10
    assert [len(t.train) for t in tasks] == [10, 20, 10]
    assert [len(t.test) for t in tasks] == [64] * 3  # evaluation is eval.max_examples' business
    own = TasksConfig(name="facts", tasks=[replace(facts[0], max_train_examples=10)])
    assert load_sequence(own, 0)[0].train == tasks[0].train  # the same seeded sample as the task's own option
    assert [len(t.train) for t in load_sequence(sequence, 0)] == [64, 20, 64]  # no cap: all of them
    assert TrainConfig(max_examples=0).errors("train") == ["train.max_examples: expected a positive number, got 0"]
