"""cl-run through the real CLI in a subprocess: the files of a run, a multirun, and bad input (exit 2, one line)."""

import csv
import json

import pytest
from helpers import cl_run, write_jsonl

QUICK = ["device=cpu", "train.epochs=2"]


@pytest.mark.slow
def test_run_writes_matrix_metrics_history_and_config(tmp_path):
    proc = cl_run(*QUICK, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    with open(run_dir / "accuracy_matrix.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["stage", "color", "city", "food"]
    assert [r[0] for r in rows[1:]] == ["init", "after_color", "after_city", "after_food"]
    assert all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[1:])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    for key in ("average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer",
                "average_learning_curve_area", "versions", "config", "wall_time_per_task_s", "device"):
        assert key in metrics
    assert len(metrics["per_task"]) == 3 and metrics["config"]["train"]["epochs"] == 2
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3 * 2 and {"train_loss", "validation_score", "tokens_per_s"} <= set(history[0])
    assert (run_dir / "config.yaml").exists()
    assert "Score matrix" in proc.stdout and str(run_dir.name) in proc.stdout
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_multirun_gives_each_job_a_numbered_directory(tmp_path):
    proc = cl_run("-m", "train.lr=1e-3,3e-3", "device=cpu", "train.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_device=cpu,train.epochs=1,train.lr=0.001", "1_device=cpu,train.epochs=1,train.lr=0.003"]
    lrs = [json.loads((sweep / j / "metrics.json").read_text())["config"]["train"]["lr"] for j in jobs]
    assert lrs == [1e-3, 3e-3]


def _task_override(tmp_path, **fields):
    base = {"name": "mine", "source": "datasets", "path": "json", "metric": "exact_match",
            "input_column": "question", "target_column": "answer"}
    base.update(fields)
    items = ",".join(f"{k}:{v}" for k, v in base.items())
    return f"tasks.tasks=[{{{items}}}]"


# The full catalogue runs in-process in test_bad_inputs.py; these go through the real console entry point.
BAD = [
    (["strategy=bogus"], "strategy=bogus: unknown option"),
    (["-m", "train.lr=1e-3,-2"], "train.lr: expected a positive number"),  # every sweep job is checked first
    (["model.name_or_path=/does/not/exist"], "model.name_or_path: directory not found"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_exits_2_with_one_line(tmp_path, args, message):
    proc = cl_run(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists() or "name_or_path" in message


@pytest.mark.slow
def test_missing_column_exits_2_naming_the_column(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "reply": "a"}] * 4)
    proc = cl_run(_task_override(tmp_path, data_files="{train:d.jsonl,test:d.jsonl}"), "device=cpu", cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "tasks.tasks.0.target_column: column 'answer' not in" in line and "question, reply" in line
    assert "\n" not in line and "Traceback" not in proc.stdout
