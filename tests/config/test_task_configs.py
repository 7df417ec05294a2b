"""Every task-sequence and experiment config composes and validates; the hub sequences are the catalogue's task
definitions (conf/tasks/catalogue/) in the published orders, and overrides reach one task; the hub-backed
benchmarks load from local files of the same schema (fixtures written here) through the same datasets code path:
prompts, label words, per-class sampling. Composition only: nothing is read from the hub."""

import dataclasses
import shutil
import string
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, make_config, run_quietly, write_jsonl
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cl_runner.cli import CONF_DIR
from cl_runner.config.schema import TaskConfig, as_dict
from cl_runner.config.validate import validate
from cl_runner.tasks.load import load_task

TASK_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "tasks").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
CATALOGUE = REPO / "conf" / "tasks" / "catalogue"
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


def _catalogue_entry(name: str) -> TaskConfig:
    """conf/tasks/catalogue/<name>.yaml read on its own: one key, the task's name, holding its definition."""
    entry = OmegaConf.load(CATALOGUE / f"{name}.yaml")
    assert list(entry) == [name], f"catalogue/{name}.yaml must define exactly the key {name!r}"
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), entry[name]))


def test_each_hub_sequence_is_the_catalogue_in_its_stated_order():
    used = set()
    for name, order in PUBLISHED_ORDERS.items():
        text = (REPO / "conf" / "tasks" / f"{name}.yaml").read_text()
        header = " ".join(line.lstrip("# ") for line in text.splitlines()[:3])
        assert " -> ".join(order.split()) in header, f"{name}: the header comment states another order"
        tasks = make_config(f"tasks={name}", small=False).tasks
        assert tasks.tasks == [_catalogue_entry(t) for t in order.split()], name
        assert tasks.catalogue == {}  # emptied once validated: metrics.json holds each task once
        used |= set(order.split())
    trace = "cstance fomc meetingbank py150 scienceqa numglue_cm numglue_ds minuten20"  # tests/tasks/test_trace.py
    assert used | set(trace.split()) == {p.stem for p in CATALOGUE.glob("*.yaml")}  # 15 + TRACE's 8, none unused


def test_an_override_by_name_reaches_only_that_task():
    plain = make_config("tasks=long15_order4").tasks.tasks
    tasks = make_config("tasks=long15_order4", "tasks.catalogue.amazon.max_eval_examples=16").tasks.tasks
    changed = [i for i, (a, b) in enumerate(zip(plain, tasks, strict=True)) if a != b]
    assert changed == [9] and tasks[9].name == "amazon" and tasks[9].max_eval_examples == 16
    assert dataclasses.replace(tasks[9], max_eval_examples=plain[9].max_eval_examples) == plain[9]


def test_an_override_by_position_works_on_written_out_lists_and_fails_loudly_on_catalogue_ones():
    tasks = make_config("tasks=offline_lm_domains", "tasks.tasks.1.max_eval_examples=16").tasks.tasks
    assert [t.max_eval_examples for t in tasks] == [None, 16, None, None]
    with pytest.raises(ConfigCompositionException):  # OmegaConf 2.3 cannot index into an interpolated list
        make_config("tasks=standard_order1", "tasks.tasks.0.max_eval_examples=16")


def test_a_hub_task_can_be_pointed_at_local_files_by_name():
    cfg = make_config("tasks=standard_order1", "tasks.catalogue.dbpedia.path=parquet",
                      "tasks.catalogue.dbpedia.subset=null",
                      "tasks.catalogue.dbpedia.data_files={train:/data/cl/dbpedia/train.parquet,test:/data/cl/dbpedia/"
                      "test.parquet}")
    task = cfg.tasks.tasks[0]
    assert (task.name, task.path, task.subset) == ("dbpedia", "parquet", None)
    assert task.data_files == {"train": "/data/cl/dbpedia/train.parquet", "test": "/data/cl/dbpedia/test.parquet"}
    assert [t.path for t in cfg.tasks.tasks[1:]] == [_catalogue_entry(t.name).path for t in cfg.tasks.tasks[1:]]


def test_a_sequence_file_can_change_a_catalogue_task_and_the_command_line_can_pick_tasks(tmp_path):
    conf = shutil.copytree(CONF_DIR, tmp_path / "conf")
    text = (conf / "tasks" / "standard_order1.yaml").read_text().replace("standard_order1", "mine")
    (conf / "tasks" / "mine.yaml").write_text(text + "catalogue:\n  yahoo: {max_train_examples: 50}\n")
    with initialize_config_dir(str(conf), version_base="1.3"):
        mine = validate(compose("config", overrides=["tasks=mine"])).tasks.tasks
        picked = validate(compose("config", overrides=["tasks=standard_order1", "tasks/catalogue=[agnews,yahoo]"]))
    assert [(t.name, t.max_train_examples) for t in mine] == [("dbpedia", 14000), ("amazon", 5000), ("yahoo", 50),
                                                              ("agnews", 4000)]
    assert [t.name for t in picked.tasks.tasks] == ["agnews", "yahoo"]


def test_the_olora_experiments_differ_only_in_their_sequence_and_name():
    def rest(name):
        config = as_dict(make_config(f"experiment={name}", small=False))
        assert config.pop("experiment_name") == name
        assert config.pop("tasks")["name"] == name.removeprefix("olora_")
        config.pop("paper")  # the published numbers of that order
        return config

    olora = [name for name in EXPERIMENTS if name.startswith("olora_") and name != "olora_smoke"]
    assert len(olora) == 6
    base = rest(olora[0])
    assert base["model"]["name_or_path"] == "google-t5/t5-large" and base["train"]["epochs"] == 1
    for name in olora[1:]:
        assert rest(name) == base, name
        assert "  - base/olora" in (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()


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
    return dataclasses.replace(task, path="json", subset=None, data_files=files, data_dir=None)


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
        if name == "copa":  # exact prompts: tests/tasks/test_benchmark_fidelity.py
            assert task.test[0].prompt.startswith("Task:COPA\nDataset:COPA\nWhich sentence is the question of ")
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


@pytest.mark.slow
def test_a_hub_sequence_runs_end_to_end_on_local_files(hub_tasks, tmp_path):
    cfg = make_config("tasks=standard_order1", "train.epochs=1")
    local = [_write_fixture(hub_tasks[t.name], tmp_path, {"train": 4, "test": 2}) for t in cfg.tasks.tasks]
    cfg.tasks.tasks = [dataclasses.replace(t, max_eval_per_class=1) for t in local]
    result = run_quietly(cfg, tmp_path / "run", base_dir=tmp_path)
    assert result["status"] == "completed"
    assert result["tasks"] == PUBLISHED_ORDERS["standard_order1"].split()
    assert result["metric_per_task"] == ["exact_match"] * 4
    assert result["examples"]["dbpedia"]["test"] == 14  # one per class
