"""The real offline sequences: built from installed Debian texts, deterministic, and runnable end to end on a CPU.

CI installs the texts (.ci/run: wordnet-base dict-gcide bible-kjv jargon-text), so nothing here skips."""

import json
import re
import subprocess
import sys

import pytest
from helpers import REPO, make_config, run_quietly

from cl_runner.core.errors import DataError
from cl_runner.tasks import load_sequence, offline

SMALL = offline.Sizes(lm_train=16, lm_validation=4, lm_test=6, max_chars=300, facts_per_domain=12)


@pytest.fixture(scope="module")
def offline_dir(tmp_path_factory):
    """A small build (seed 0) that the task configs read through CL_DATA_DIR."""
    data_dir = tmp_path_factory.mktemp("data")
    offline.build(data_dir, seed=0, sizes=SMALL)
    return data_dir


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_builds_the_same_files_and_another_seed_others(offline_dir, tmp_path):
    first = _files(offline_dir / offline.DIR_NAME)
    assert _files(offline.build(tmp_path / "again", seed=0, sizes=SMALL)) == first
    other = _files(offline.build(tmp_path / "seed1", seed=1, sizes=SMALL))
    assert other.keys() == first.keys()
    assert [name for name in first if name.endswith(".jsonl") and other[name] == first[name]] == []
    manifest = json.loads(first["manifest.json"])
    assert manifest["seed"] == 0 and manifest["version"] == offline.VERSION
    assert set(manifest["debian_packages"]) >= set(offline.APT_PACKAGES)


def test_the_files_hold_real_text_of_each_domain(offline_dir):
    root = offline_dir / offline.DIR_NAME

    def rows(name):
        return [json.loads(line) for line in (root / name).read_text().splitlines()]

    sizes = {"train": SMALL.lm_train, "validation": SMALL.lm_validation, "test": SMALL.lm_test}
    for domain in offline.LM_DOMAINS:
        texts = {split: [r["text"] for r in rows(f"lm/{domain}/{split}.jsonl")] for split in sizes}
        assert {split: len(t) for split, t in texts.items()} == sizes
        assert not set(texts["train"]) & set(texts["test"])  # held-out documents are held out
        assert all(0 < len(t) <= SMALL.max_chars for split in texts.values() for t in split)
    assert any(" n. " in t for t in [r["text"] for r in rows("lm/definitions/train.jsonl")])  # "Apple, n. 1. ..."
    assert any(t.startswith(("def ", "class ", "async def ", "@")) for t in
               [r["text"] for r in rows("lm/python/train.jsonl")])
    assert all(re.search(r" \d+:\d+(-\d+)? ", r["text"][:40]) for r in rows("lm/scripture/test.jsonl"))  # Job 3:1-4


def test_wordnet_tasks_share_subjects_with_domain_specific_answers(offline_dir):
    root = offline_dir / offline.DIR_NAME / "wordnet"
    facts = {d: {r["word"]: r for r in map(json.loads, (root / f"{d}.jsonl").read_text().splitlines())}
             for d in offline.WORDNET_DOMAINS}
    assert all(len(f) == SMALL.facts_per_domain for f in facts.values())
    animal, food = facts["animal"], facts["food"]
    shared = animal.keys() & food.keys()
    assert len(shared) >= SMALL.facts_per_domain // 2  # interference by design: the same words, other answers
    assert all(animal[w]["hypernym"] != food[w]["hypernym"] for w in shared)
    assert all(r["gloss"] and r["domain"] == d for d, f in facts.items() for r in f.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["offline_lm_domains", "offline_wordnet_senses"])
def test_cpu_smoke_run_of_each_offline_sequence(name, offline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CL_DATA_DIR", str(offline_dir))
    result = run_quietly(make_config(f"tasks={name}", "train.epochs=1"), tmp_path / "run", base_dir=tmp_path)
    assert result["status"] == "completed"
    expected = offline.LM_DOMAINS if name == "offline_lm_domains" else offline.WORDNET_DOMAINS
    assert result["tasks"] == list(expected)
    metric = "perplexity" if name == "offline_lm_domains" else "exact_match"
    assert result["metric_per_task"] == [metric] * 4
    assert len(result["stages"]) == 5  # init + one row per task
    if name == "offline_lm_domains":
        first_task = result["stages"][1]["scores"]["definitions"]["score"]
        assert first_task < result["stages"][0]["scores"]["definitions"]["score"]  # training lowers perplexity


def test_a_config_builds_its_data_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_DATA_DIR", str(tmp_path / "fresh"))
    tasks = load_sequence(make_config("tasks=offline_wordnet_senses").tasks, seed=0, base_dir=tmp_path)
    assert (tmp_path / "fresh" / offline.DIR_NAME / "manifest.json").is_file()
    defaults = offline.Sizes()
    assert [len(t.test) for t in tasks] == [defaults.facts_per_domain] * 4
    assert tasks[0].test[0].prompt.startswith('What kind of animal is "') and tasks[0].test[0].prompt.endswith(
        "?\nAnswer:")


def test_missing_texts_name_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setitem(offline.SOURCES, "jargon", offline.Source("jargon-text", str(tmp_path / "no-jargon.gz")))
    monkeypatch.setitem(offline.SOURCES, "wordnet", offline.Source("wordnet-base", str(tmp_path / "no-wordnet")))
    monkeypatch.setenv("CL_DATA_DIR", str(tmp_path / "data"))
    cfg = make_config("tasks=offline_lm_domains")
    with pytest.raises(DataError, match=r"apt-get install -y --no-install-recommends jargon-text wordnet-base"):
        load_sequence(cfg.tasks, seed=0, base_dir=tmp_path)
    assert not (tmp_path / "data" / offline.DIR_NAME).exists()  # nothing half-built


@pytest.mark.slow
def test_a_file_missing_from_an_existing_build_says_how_to_rebuild(offline_dir, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(offline_dir), str(copy)], check=True)
    (copy / offline.DIR_NAME / "wordnet" / "food.jsonl").unlink()
    monkeypatch.setenv("CL_DATA_DIR", str(copy))
    with pytest.raises(DataError, match=r"tasks.tasks.2.data_files: .*food.jsonl is missing .* --force"):
        load_sequence(make_config("tasks=offline_wordnet_senses").tasks, seed=0, base_dir=tmp_path)


@pytest.mark.slow
def test_the_builder_script(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "build_offline_data.py"), "--data-dir", str(tmp_path),
               "--lm-train", "4", "--lm-validation", "2", "--lm-test", "2", "--facts-per-domain", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wordnet/food.jsonl: 4 rows" in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--force" in again.stderr
