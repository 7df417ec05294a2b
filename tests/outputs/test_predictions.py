"""Predictions on disk (eval.save_predictions) and cl-report --flips: the files hold what the scoring computed (the
score recomputed from a file is the matrix cell, for every metric kind), only the stages asked for are written, a
resumed run leaves the same files as an uninterrupted one, and flips are read from the files, with one-line
errors when they are not on disk."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import LOCAL_SEQUENCE, make_config, run_quietly, write_jsonl, write_local_sequence
from rich.console import Console
from scored_items import LABELS, items, tiny_scorer

from cl_runner import report_cli
from cl_runner.engine.sequence import SequenceRun
from cl_runner.outputs import predictions, report
from cl_runner.scoring.answers import normalize_answer
from cl_runner.scoring.evaluate import Scorer, score_task
from cl_runner.tasks.encode import EncodedTask, EvalItem


@pytest.mark.parametrize("metric", ["exact_match", "label_accuracy", "perplexity"])
def test_the_score_recomputed_from_the_written_file_is_the_tasks_score(tmp_path, metric):
    scorer = tiny_scorer()
    task = EncodedTask("t", [], [], items(scorer), [[20], [21, 22], [23]])
    result = score_task(scorer, task, metric, "\n", LABELS, max_new_tokens=3)
    if metric != "perplexity":
        assert 0 < result["score"] < 1
    writer = predictions.PredictionWriter(tmp_path, "final", "after_t", [SimpleNamespace(name="t", metric=metric)],
                                          lambda j: task.test, scorer.decode)
    writer.write("after_t", {0: result.pop("examples")})
    records = predictions.read_records(tmp_path / "predictions" / "after_t" / "t.jsonl")
    assert [r["index"] for r in records] == list(range(len(task.test)))
    assert predictions.score(records, metric) == result["score"]
    assert "examples" not in score_task(Scorer(**{**scorer.__dict__, "examples": False}), task, metric, "\n", LABELS)
    if metric == "label_accuracy":  # each record is its own example's (the order of the file is the items')
        assert all(r["prediction"] == max(r["label_scores"], key=r["label_scores"].get) for r in records)
        assert all(r["correct"] == (r["prediction"] == r["target"]) for r in records)
    if metric == "exact_match":
        assert sum(not r["prediction"] for r in records) == result["blank"]
        assert all(r["correct"] == (normalize_answer(r["generated"], "\n") == normalize_answer(r["target"], "\n"))
                   for r in records)


def test_only_the_stages_asked_for_are_written_and_a_rewrite_replaces_the_file(tmp_path):
    tasks = [SimpleNamespace(name="a/b", metric="exact_match"), SimpleNamespace(name="c", metric="exact_match")]
    item = EvalItem([5, 6], [7, 1], " x")
    record = {"generated": " x", "prediction": "x", "correct": True}

    def written(when: str, main: bool = True) -> list[str]:
        root = tmp_path / f"{when}{main}"
        writer = predictions.PredictionWriter(root, when, "after_c", tasks, lambda j: [item], str, main)
        for stage in ("init", "after_a/b", "after_c"):
            writer.write(stage, {0: [record], 1: None})  # task 1: a scoring that keeps no records
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jsonl"))

    assert written("final") == ["predictions/after_c/a_b.jsonl"]
    assert written("every") == ["predictions/after_a_b/a_b.jsonl", "predictions/after_c/a_b.jsonl",
                                "predictions/init/a_b.jsonl"]
    assert written("none") == [] and written("every", main=False) == []
    writer = predictions.PredictionWriter(tmp_path / "again", "final", "after_c", tasks, lambda j: [item], str)
    for _ in range(2):  # a stage scored again after a resume: the same single file
        writer.write("after_c", {0: [record]})
    assert len((tmp_path / "again/predictions/after_c/a_b.jsonl").read_text().splitlines()) == 1


def test_long_prompts_keep_their_head_and_end():
    text = "H" * 150 + "M" * 100 + "E" * 250
    assert predictions.cut(text) == "H" * 100 + " … " + "E" * 200
    assert predictions.cut("short") == "short"


# ------------------------------------------------------------------------------------------------------ flips
def crafted_run(root: Path, saved: str = "every") -> Path:
    """A run directory with metrics.json and predictions of task `qa` at two stages (no training)."""
    metrics = {"tasks": ["qa", "wiki"], "metric_per_task": ["exact_match", "perplexity"],
               "config": {"eval": {"save_predictions": saved}},
               "stages": [{"stage": s, "scores": {"qa": {"score": 0.5}, "wiki": {"score": 9.0}}}
                          for s in ("init", "after_qa", "after_wiki")]}
    (root / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "metrics.json").write_text(json.dumps(metrics))
    right = {"init": [True, True, False, False], "after_wiki": [True, False, True, False]}
    for stage, flags in right.items():
        write_jsonl(root / "predictions" / stage / "qa.jsonl",
                    [{"index": i, "prompt": f"question {i}?", "target": f"a{i}", "generated": f" {stage}{i}",
                      "prediction": f"{stage}{i}" if i != 1 else "", "correct": c} for i, c in enumerate(flags)])
    return root


def flips_output(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        report_cli.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_flips_between_two_crafted_prediction_files(tmp_path, capsys, monkeypatch):
    run_dir = crafted_run(tmp_path / "run")
    lost, gained = predictions.flips(*(predictions.read_records(run_dir / f"predictions/{s}/qa.jsonl")
                                       for s in ("init", "after_wiki")))
    assert [a["index"] for a, _ in lost] == [1] and [a["index"] for a, _ in gained] == [2]
    monkeypatch.setattr(report, "Console", lambda: Console(width=200))
    code, out, _ = flips_output([str(run_dir), "--flips", "init:wiki", "--task", "qa"], capsys)
    assert code == 0
    assert "qa init → after_wiki: score 0.500 → 0.500 · 1 right → wrong · 1 wrong → right (of 4 examples)" in out
    assert "question 1?" in out and "(blank)" in out and "question 2?" in out and "question 0?" not in out
    assert not (run_dir / "report.csv").exists()  # --flips prints only


@pytest.mark.parametrize("argv, message", [
    (["--flips", "init:after_qa"], "predictions/after_qa/qa.jsonl: no predictions on disk (the run had "
                                   "eval.save_predictions=final); run with eval.save_predictions=every"),
    (["--flips", "init:later"], "--flips: 'later' is not a stage of this run; expected one of init, after_qa, "
                                "after_wiki"),
    (["--flips", "init"], "--flips: expected STAGE:STAGE"),
    (["--flips", "init:after_wiki", "--task", "wiki"], "--task: wiki is scored by perplexity, which has no right or "
                                                      "wrong per example"),
    (["--flips", "init:after_wiki", "--task", "nope"], "--task: 'nope' is not a task of this run"),
])
def test_flips_without_what_they_need_are_one_line_errors(tmp_path, capsys, argv, message):
    run_dir = crafted_run(tmp_path / "run", saved="final")
    code, out, err = flips_output([str(run_dir), *argv], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("cl-report: error: ") and message in err


# ----------------------------------------------------------------------------------------------- end to end
def matrix(run_dir: Path) -> dict[str, dict[str, str]]:
    with (run_dir / "accuracy_matrix.csv").open(newline="") as handle:
        return {row.pop("stage"): row for row in csv.DictReader(handle)}


def tree(run_dir: Path) -> dict[str, str]:
    return {p.relative_to(run_dir).as_posix(): p.read_text() for p in (run_dir / "predictions").rglob("*.jsonl")}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The three metric kinds (label accuracy, exact match, perplexity), every stage's predictions kept."""
    root = tmp_path_factory.mktemp("predictions")
    write_local_sequence(root)
    cfg = make_config("tasks.name=local", "train.epochs=3", "eval.save_predictions=every",
                      "checkpoint.every_n_steps=1", tasks=LOCAL_SEQUENCE)
    return root, cfg, run_quietly(cfg, root / "run", base_dir=root)


@pytest.mark.slow
def test_every_stages_files_give_the_matrix_cells_and_flips_read_them(local_run, capsys):
    root, _, result = local_run
    run_dir, cells = root / "run", matrix(root / "run")
    assert len(tree(run_dir)) == 4 * 3
    for stage, row in cells.items():
        for task, kind in zip(result["tasks"], result["metric_per_task"], strict=True):
            records = predictions.read_records(predictions.stage_file(run_dir, stage, task))
            assert predictions.score(records, kind) == float(row[task]), (stage, task)
            assert len(records) == result["stages"][0]["scores"][task]["n"]
    first = predictions.read_records(predictions.stage_file(run_dir, "init", "qa"))
    last = predictions.read_records(predictions.stage_file(run_dir, "after_wiki", "qa"))
    lost, gained = predictions.flips(first, last)
    code, out, _ = flips_output([str(run_dir), "--flips", "init:after_wiki"], capsys)
    assert code == 0 and f"{len(lost)} right → wrong · {len(gained)} wrong → right (of 4 examples)" in out
    assert "sentiment init → after_wiki" in out and "wiki init" not in out  # perplexity has no flips


@pytest.mark.slow
def test_a_resumed_run_leaves_the_same_prediction_files(local_run, monkeypatch):
    root, cfg, _ = local_run
    original = SequenceRun.add_stage

    def add_stage(self, stage, results):  # fails right after scoring the first task, before its checkpoint
        original(self, stage, results)
        if stage == "after_sentiment":
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(SequenceRun, "add_stage", add_stage)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_quietly(cfg, root / "resumed", base_dir=root)
    from cl_runner.engine.run import run

    run(cfg, root / "resumed", console=Console(quiet=True), base_dir=root, resume=True)
    assert tree(root / "resumed") == tree(root / "run")


def test_an_unknown_save_predictions_value_names_the_key_and_the_choices():
    with pytest.raises(Exception, match="eval.save_predictions: expected one of final, every, none, got 'always'"):
        make_config("eval.save_predictions=always")
