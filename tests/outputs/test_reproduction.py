"""cl-report --paper: runs beside the papers' numbers (the experiment files' paper: blocks), rows not run said
plainly; the docs page shows the same table; the O-LoRA smoke experiment runs the whole pipeline on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, make_config, run_quietly
from olora_cases import cl_benchmark

from cl_runner.outputs.reproduction import NOT_RUN, experiment_rows, markdown, reproduction
from cl_runner.report_cli import main as report_main

OLORA = {"name": "adapters", "merge": False, "orthogonal_lambda": 0.0, "rank": 8}
AS_PUBLISHED = {"adapters": {"merge": True, "orthogonal_lambda": 0.5}}  # base/olora.yaml's sequence overrides


def fake_run(root: Path, name: str, experiment: str, strategy: dict, accuracy: float | None, status="completed",
             seed=0, sequence_overrides=None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"strategy": strategy, "tasks": {"strategy_overrides": sequence_overrides or {}}, "seed": seed,
              "model": {"name_or_path": "google-t5/t5-large", "arch": {}}}
    metrics = {"status": status, "experiment_name": experiment, "strategy": strategy["name"], "seed": seed,
               "config": config} | ({"average_accuracy": accuracy} if accuracy is not None else {})
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def row(rows, experiment, method):
    return next(r for r in rows if (r.experiment, r.method) == (experiment, method))


def test_the_experiment_files_state_table_1_with_its_source():
    rows = [r for r in experiment_rows() if r.experiment.startswith("olora_")]
    assert {r.experiment for r in rows} == {f"olora_standard_order{i}" for i in (1, 2, 3)} | {
        f"olora_long15_order{i}" for i in (4, 5, 6)}
    olora = [row(rows, e, "O-LoRA").value for e in ("olora_standard_order1", "olora_standard_order2",
                                                     "olora_standard_order3", "olora_long15_order4",
                                                     "olora_long15_order5", "olora_long15_order6")]
    assert olora == [75.4, 75.7, 76.3, 72.3, 64.8, 71.6]
    assert row(rows, "olora_standard_order1", "SeqFT").strategy == "naive"
    assert all("Table 1" in r.source for r in rows)


def test_the_trace_experiment_files_state_traces_llama_2_7b_chat_row():
    trace = {r.experiment: r for r in experiment_rows() if r.experiment.startswith("trace_")}
    assert {e: (r.method, r.strategy, r.value) for e, r in trace.items()} == {
        "trace_seqft": ("SeqFT", "naive", 48.7), "trace_lora": ("LoRASeqFT", "shared_lora", 12.7),
        "trace_replay": ("Replay", "replay", 55.5)}
    assert all("arXiv:2310.06762" in r.source and "unchecked" in r.source for r in trace.values())


def test_runs_sit_beside_their_rows_and_unrun_rows_say_so(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, acc in ((0, 0.70), (1, 0.74)):  # O-LoRA as the experiment file runs it: options from the sequence
        fake_run(sweep, f"olora{seed}", "olora_standard_order1", OLORA, acc, seed=seed, sequence_overrides=AS_PUBLISHED)
    fake_run(sweep, "inclora", "olora_standard_order1", OLORA, 0.6,
             sequence_overrides={"adapters": {"merge": True, "orthogonal_lambda": 0.0}})
    fake_run(sweep, "seqft", "olora_standard_order1", {"name": "naive"}, None, status="failed")
    fake_run(sweep, "elsewhere", "my_own", {"name": "naive"}, 0.5)
    rows, unmatched = reproduction([sweep])
    text, lora = markdown(rows), "adapters merge=true orthogonal_lambda"
    assert f"| olora_standard_order1 | O-LoRA | {lora}=0.5 | 75.4 | 72.0 ± 2.8 | -3.4 | 2 runs, google-t5/t5-large |" \
        in text
    assert f"| olora_standard_order1 | IncLoRA | {lora}=0.0 | 66.0 | 60.0 | -6.0 |" in text
    assert "| olora_standard_order1 | SeqFT | naive | 18.9 |  |  | no completed run (failed) |" in text
    assert f"| olora_standard_order2 | O-LoRA | {lora}=0.5 | 75.7 |  |  | {NOT_RUN} |" in text
    assert [job.name for job in unmatched] == ["elsewhere"]


def test_an_experiment_of_ones_own_brings_its_numbers_in_its_config(tmp_path):
    run_dir = fake_run(tmp_path, "run", "mine", {"name": "replay"}, 0.5)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["config"]["paper"] = {"source": "Me 2026, Table 9", "rows": [
        {"method": "Replay", "strategy": "replay", "value": 40.0}, {"method": "EWC", "strategy": "ewc", "value": 1}]}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    rows, _ = reproduction([run_dir])
    assert row(rows, "mine", "Replay").scores() == [50.0]
    assert [r.method for r in rows if r.experiment == "mine"] == ["Replay"]  # borrowed rows: only what ran


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def test_cl_report_paper_prints_and_writes_the_table_where_asked(tmp_path, capsys, monkeypatch):
    """Into --out, or the one run (or sweep) given; a folder of runs is printed and nothing is written."""
    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path / "runs", "a", "olora_long15_order6", {"name": "replay"}, 0.531)
    row = "| olora_long15_order6 | Replay | replay | 53.1 | 53.1 | +0.0 | 1 run, google-t5/t5-large |"
    before = _tree(tmp_path)
    report_main(["--paper", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert row in out and "not written: " in out and _tree(tmp_path) == before
    report_main(["--paper", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert row in out and (tmp_path / "out" / "reproduction.md").read_text() == out
    report_main(["--paper", str(run)])
    assert (run / "reproduction.md").read_text() == capsys.readouterr().out


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: root / "nowhere", "no such directory"),
    (lambda root: root, "no runs found"),  # an empty directory
    (lambda root: (root / "data").mkdir() or (root / "data" / "rows.jsonl").write_text("{}\n") and root / "data",
     "no runs found"),  # a directory of other files
    (lambda root: (root / "file.txt").write_text("x") and root / "file.txt", "not a directory"),
])
def test_cl_report_paper_on_what_holds_no_run_exits_2_and_writes_nothing(tmp_path, capsys, make, message):
    path = make(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        report_main(["--paper", str(path)])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "" and err.startswith(f"cl-report: error: {path}: {message}")
    assert len(err.strip().splitlines()) == 1
    assert _tree(tmp_path) == before


def test_the_docs_page_shows_the_table_with_the_rows_not_run():
    assert markdown(experiment_rows()) in (REPO / "docs" / "benchmarks.md").read_text()


@pytest.mark.slow
def test_the_olora_smoke_experiment_runs_end_to_end_and_reports_beside_the_paper(tmp_path, monkeypatch):
    root = cl_benchmark(tmp_path / "CL_Benchmark", {"train": 16, "dev": 2, "test": 8})
    monkeypatch.setenv("CL_BENCHMARK_DIR", str(root))  # O-LoRA's released layout, offline
    cfg = make_config("experiment=olora_smoke", small=False)
    assert cfg.model.arch["model_type"] == "t5" and cfg.strategy.name == "adapters"
    metrics = run_quietly(cfg, tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["tasks"] == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert metrics["examples"]["dbpedia"]["train"] == 16
    rows, unmatched = reproduction([tmp_path / "run"])
    assert not unmatched and len(row(rows, "olora_smoke", "O-LoRA").scores()) == 1
