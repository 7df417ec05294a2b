"""Every task-sequence and experiment config composes and validates; the hub-backed benchmarks load from local
files of the same schema (fixtures written here) through the same datasets code path: prompts, label words,
per-class sampling."""

import dataclasses
import string
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, make_config, run_quietly, write_jsonl
from omegaconf import OmegaConf

from cl_runner.tasks.load import load_task

TASK_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "tasks").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
HUB = [name for name in TASK_CONFIGS if name.startswith(("standard_", "long15_"))]
PUBLISHED_ORDERS = {  # O-LoRA (arXiv:2310.14152) orders 1-6, as in its code and Progressive Prompts
    "standard_order1": "dbpedia amazon yahoo agnews",
    "standard_order2": "dbpedia amazon agnews yahoo",
    "standard_order3": "yahoo amazon agnews dbpedia",
    "long15_order4": "mnli cb wic copa qqp boolq rte imdb yelp amazon sst2 dbpedia agnews multirc yahoo",
    "long15_order5": "multirc boolq wic mnli cb copa qqp rte imdb sst2 dbpedia agnews yelp amazon yahoo",
    "long15_order6": "yelp amazon mnli cb copa qqp rte imdb sst2 dbpedia agnews yahoo multirc boolq wic",
}


@pytest.mark.parametrize("name", TASK_CONFIGS)
def test_every_task_config_composes_and_validates(name):
    cfg = make_config(f"tasks={name}")
    assert cfg.tasks.tasks
    if name != "default":
        assert cfg.tasks.name == name  # what metrics.json records as the sequence


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = make_config(f"experiment={name}", small=False)
    assert cfg.experiment_name == name
    text = (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and "Reported in the paper" in text
    assert f"override /tasks: {cfg.tasks.name}" in text


def test_the_hub_sequences_are_the_published_orders():
    assert set(HUB) == set(PUBLISHED_ORDERS)
    for name, order in PUBLISHED_ORDERS.items():
        assert [t.name for t in make_config(f"tasks={name}").tasks.tasks] == order.split()


def test_a_dataset_is_defined_the_same_way_in_every_sequence():
    seen: dict[str, tuple[str, dict]] = {}
    for name in HUB:
        for task in OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "tasks" / f"{name}.yaml"))["tasks"]:
            first = seen.setdefault(task["name"], (name, task))
            assert task == first[1], f"{task['name']} differs between {first[0]} and {name}"
    assert len(seen) == 15


def test_the_readme_override_to_local_files_composes():
    cfg = make_config("tasks=standard_order1", "tasks.tasks.0.path=parquet", "tasks.tasks.0.subset=null",
                      "tasks.tasks.0.data_files={train:/data/cl/dbpedia/train.parquet,test:/data/cl/dbpedia/"
                      "test.parquet}")
    task = cfg.tasks.tasks[0]
    assert (task.path, task.subset) == ("parquet", None)
    assert task.data_files == {"train": "/data/cl/dbpedia/train.parquet", "test": "/data/cl/dbpedia/test.parquet"}


# ------------------------------------------------------------------------------------------- local fixtures
def _columns(task) -> list[str]:
    used = {field for _, field, _, _ in string.Formatter().parse(task.template) if field}
    return sorted((used | {task.input_column}) - {"input", task.target_column})


def _write_fixture(task, root: Path, per_class: dict[str, int]):
    """Files with the hub dataset's columns and integer labels, one per split the config reads."""
    names = {"train": task.train_split, "test": task.test_split}
    if task.validation_split:
        names["validation"] = task.validation_split
    files = {}
    for role, split in names.items():
        rows = [{**{c: f"{c} of {task.name} {role} row {label}.{i}" for c in _columns(task)},
                 task.target_column: int(label)}
                for label in task.verbalizer for i in range(per_class.get(role, per_class["test"]))]
        files[split] = str(write_jsonl(root / task.name / f"{split}.jsonl", rows))
    return dataclasses.replace(task, path="json", subset=None, data_files=files)


@pytest.fixture(scope="module")
def hub_tasks():
    """The 15 distinct hub-backed task definitions (each dataset once)."""
    tasks = {}
    for name in HUB:
        for task in make_config(f"tasks={name}").tasks.tasks:
            tasks.setdefault(task.name, task)
    return tasks


def test_hub_configs_load_from_local_files_with_prompt_and_label_words(hub_tasks, tmp_path):
    for name, hub_task in hub_tasks.items():
        local = _write_fixture(hub_task, tmp_path, {"train": 12, "validation": 3, "test": 3})
        local = dataclasses.replace(local, max_train_per_class=4, max_eval_per_class=2)
        task = load_task(local, seed=0, base_dir=tmp_path, key=f"tasks.tasks.{name}")
        words = list(hub_task.verbalizer.values())
        assert task.labels == [f" {w}" for w in words]
        assert Counter(e.target for e in task.test) == {f" {w}": 2 for w in words}, name  # 2 per class
        assert all(count <= 4 for count in Counter(e.target for e in task.train).values()), name
        assert len(task.train) >= 3 * len(words), name
        instruction = hub_task.template.split("{")[0]
        for example in task.train + task.test:
            assert example.prompt.startswith(instruction) and example.prompt.endswith("\nAnswer:"), name
            assert f"{hub_task.input_column} of {name}" in example.prompt, name
            assert "{" not in example.prompt, name  # every placeholder filled from a column
        if name == "copa":
            assert task.test[0].prompt.startswith("Which sentence is the question of ")
        else:
            assert "\nOption: " in task.test[0].prompt


def test_per_class_sampling_is_seeded(hub_tasks, tmp_path):
    local = _write_fixture(hub_tasks["dbpedia"], tmp_path, {"train": 6, "test": 4})
    local = dataclasses.replace(local, max_train_per_class=2, max_eval_per_class=2)

    def prompts(seed):
        task = load_task(local, seed=seed, base_dir=tmp_path, key="tasks.tasks.0")
        return [e.prompt for e in task.train + task.test]

    assert prompts(0) == prompts(0)
    assert prompts(0) != prompts(1)


def test_a_hub_sequence_runs_end_to_end_on_local_files(hub_tasks, tmp_path):
    cfg = make_config("tasks=standard_order1", "train.epochs=1")
    local = [_write_fixture(hub_tasks[t.name], tmp_path, {"train": 4, "test": 2}) for t in cfg.tasks.tasks]
    cfg.tasks.tasks = [dataclasses.replace(t, max_eval_per_class=1) for t in local]
    result = run_quietly(cfg, tmp_path / "run", base_dir=tmp_path)
    assert result["status"] == "completed"
    assert result["tasks"] == PUBLISHED_ORDERS["standard_order1"].split()
    assert result["metric_per_task"] == ["exact_match"] * 4
    assert result["examples"]["dbpedia"]["test"] == 14  # one per class
