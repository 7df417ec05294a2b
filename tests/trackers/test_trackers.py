"""Experiment trackers (logger=...): what a run writes is read back with each tracker's own reader (TensorBoard's
EventAccumulator, MlflowClient on a file store, wandb's offline run directory) and holds the run's values; a
resumed run continues the same tracker runs without doubled points; a tracker that raises costs one warning
line, never the run; a tracker whose package is missing is a one-line error before anything runs."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
from pathlib import Path

import pytest
from helpers import make_config, run_quietly
from rich.console import Console

from cl_runner import cli
from cl_runner.engine.run import run
from cl_runner.engine.sequence import SequenceRun
from cl_runner.trackers import backends, fanout
from cl_runner.trackers import schema as tracker_schema
from cl_runner.trackers.backends import CsvTracker, Tracker
from cl_runner.trackers.fanout import Trackers

ONE_EPOCH = ["train.epochs=1"]  # 3 tasks x 8 steps: global steps 8, 16, 24
FINAL_STEPS = [8, 16, 24]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def csv_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "logged_metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def resume_quietly(cfg, run_dir: Path) -> dict:
    return run(cfg, run_dir, console=Console(file=io.StringIO()), resume=True)


def main_exit(argv: list[str], capsys) -> tuple[int, list[str]]:
    """cli.main in this process: (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def mlflow_client(store: Path):
    pytest.importorskip("mlflow")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads file stores only when asked to
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                                "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One run with tensorboard, mlflow (a file store) and csv at once."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("tracked")
    cfg = make_config(*ONE_EPOCH, "logger=many_loggers", f"logger.mlflow.tracking_uri={root / 'mlruns'}")
    metrics = run_quietly(cfg, root / "run")
    return root, root / "run", metrics


@pytest.mark.slow
def test_tensorboard_events_hold_the_runs_values(tracked_run):
    _, run_dir, metrics = tracked_run
    tb = events(run_dir)
    epochs = history(run_dir)
    losses = tb.Scalars("epoch/train_loss")
    assert [e.step for e in losses] == FINAL_STEPS  # one global step axis across the tasks
    assert [e.value for e in losses] == pytest.approx([r["train_loss"] for r in epochs], rel=1e-6)
    assert [e.step for e in tb.Scalars("train/loss")] == FINAL_STEPS
    final_row = [stage["scores"][t]["score"] for stage in metrics["stages"][-1:] for t in metrics["tasks"]]
    assert [tb.Scalars(f"score/{t}")[-1].value for t in metrics["tasks"]] == pytest.approx(final_row)
    assert tb.Scalars("summary/average_accuracy")[-1].value == pytest.approx(metrics["average_accuracy"])
    assert [image.step for image in tb.Images("score_matrix")] == [0, *FINAL_STEPS]  # init + each stage
    assert tb.Tensors("status/text_summary")[-1].tensor_proto.string_val[0] == b"completed"


@pytest.mark.slow
def test_mlflow_file_store_holds_the_runs_values(tracked_run):
    root, run_dir, metrics = tracked_run
    client = mlflow_client(root / "mlruns")
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "cl"  # experiment_name
    assert run.data.params["train.epochs"] == "1" and run.data.params["strategy.name"] == '"naive"'
    history_losses = [r["train_loss"] for r in history(run_dir)]
    assert [m.value for m in client.get_metric_history(run_id, "epoch/train_loss")] == pytest.approx(history_losses)
    assert run.data.metrics["summary/average_accuracy"] == pytest.approx(metrics["average_accuracy"])
    run_files = {a.path for a in client.list_artifacts(run_id, "run")}
    assert {"run/metrics.json", "run/history.jsonl", "run/accuracy_matrix.csv"} <= run_files
    assert "run/checkpoints" not in run_files
    matrices = {a.path for a in client.list_artifacts(run_id, "score_matrix")}
    assert "score_matrix/after_food.png" in matrices
    table = client.download_artifacts(run_id, "score_matrix/00000024_after_food.json", str(root))
    assert json.loads(Path(table).read_text())["rows"] == [[s["scores"][t]["score"] for t in metrics["tasks"]]
                                                           for s in metrics["stages"]]


@pytest.mark.slow
def test_csv_holds_every_logged_value_once(tracked_run):
    _, run_dir, metrics = tracked_run
    rows = csv_rows(run_dir)
    keys = [(r["step"], r["name"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert rows[-1]["name"] == "status" and rows[-1]["value"] == "completed"
    assert float(next(r["value"] for r in rows if r["name"] == "summary/average_accuracy")) == pytest.approx(
        metrics["average_accuracy"])


def crash_after(stage_name: str, monkeypatch) -> None:
    """The run fails right after scoring ``stage_name`` (before that task's end-of-task checkpoint)."""
    original = SequenceRun.add_stage

    def add_stage(self, stage, results):
        original(self, stage, results)
        if stage == stage_name:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(SequenceRun, "add_stage", add_stage)


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tracker_runs_without_doubled_points(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    cfg = make_config(*ONE_EPOCH, "checkpoint.every_n_steps=5", "logger=many_loggers",
                      f"logger.mlflow.tracking_uri={store}")
    with monkeypatch.context() as patch:
        crash_after("after_color", patch)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_quietly(cfg, run_dir)
    first = json.loads((run_dir / "trackers.json").read_text())
    client = mlflow_client(store)
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "FAILED"
    assert [r["value"] for r in csv_rows(run_dir) if r["name"] == "status"] == ["failed"]

    resume_quietly(cfg, run_dir)  # from the checkpoint at step 5 of the first task
    assert json.loads((run_dir / "trackers.json").read_text()) == first
    run_id = first["mlflow"]["run_id"]
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert [e.step for e in events(run_dir).Scalars("train/loss")] == FINAL_STEPS  # purged, logged again once
    keys = [(r["step"], r["name"]) for r in csv_rows(run_dir)]
    assert len(keys) == len(set(keys)) and ("24", "summary/average_accuracy") in keys


@pytest.mark.slow
def test_wandb_offline_writes_its_run_directory_and_a_resume_keeps_the_run_id(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = make_config(*ONE_EPOCH, "checkpoint.every_n_steps=5", "logger=wandb", "logger.wandb.mode=offline")
    with monkeypatch.context() as patch:
        crash_after("after_city", patch)
        with pytest.raises(RuntimeError):
            run_quietly(cfg, run_dir)
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    metrics = resume_quietly(cfg, run_dir)
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"] == run_id
    wandb.teardown()  # wandb's service writes the run's records to disk after finish() returns; this waits for it
    lives = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(lives) == 2 and all(d.name.endswith(f"-{run_id}") for d in lives)  # one tracker run, two lives
    records = (lives[-1] / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in records and b"summary/average_accuracy" in records
    tables = [json.loads(p.read_text())["data"] for p in (lives[-1] / "files" / "media" / "table").glob("*.json")]
    final = [metrics["stages"][-1]["scores"][t]["score"] for t in metrics["tasks"]]
    assert ["after_food", *final] in [rows[-1] for rows in tables]  # the whole matrix after the last task


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_server_down_and_a_logger_that_raises_cost_one_warning_each_and_never_the_run(tmp_path, monkeypatch,
                                                                                      caplog):
    pytest.importorskip("mlflow")

    def broken(self, values, step):
        raise OSError("tracker backend down")

    monkeypatch.setattr(CsvTracker, "scalars", broken)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_config(*ONE_EPOCH, "logger=[mlflow,csv]", f"logger.mlflow.tracking_uri=http://127.0.0.1:{closed_port()}")
    with caplog.at_level(logging.WARNING):
        metrics = run_quietly(cfg, tmp_path / "run")
    assert metrics["status"] == "completed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "logger mlflow could not start" in warnings[0] and "Connection refused" in warnings[0]
    assert "logger csv failed" in warnings[1] and "tracker backend down" in warnings[1]


class Recording(Tracker):
    name = "recording"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def scalars(self, values, step):
        self.calls.append(f"scalars@{step}")

    def close(self, status, error):
        self.calls.append(f"close:{status}")


class Raising(Tracker):
    name = "raising"

    def scalars(self, values, step):
        raise ConnectionError("server down")


class Status:
    status, error, results = "interrupted", None, {}


def test_fanout_drops_a_raising_tracker_after_one_warning_and_feeds_the_others(caplog):
    recording = Recording()
    trackers = Trackers([Raising(), recording], ["a"], ["exact_match"])
    event = {"event": "step", "step": 3, "epoch": 1, "loss": 1.0, "tokens_per_s": 10.0, "mfu": None, "extras": {}}
    ctx = type("Ctx", (), {"task_index": 0, "optimizer": None})()
    with caplog.at_level(logging.WARNING):
        trackers.on_step(event, ctx)
        trackers.on_step({**event, "step": 5}, ctx)
        trackers.close(Status())
        trackers.close(Status())  # a second close does nothing
    assert [r.getMessage() for r in caplog.records] == [
        "logger raising failed and is switched off for this run (ConnectionError: server down)"]
    assert recording.calls == ["scalars@3", "scalars@5", "close:interrupted"]


def test_a_tracker_that_cannot_start_costs_one_warning(tmp_path, monkeypatch, caplog):
    class Unreachable(Tracker):
        def __init__(self, cfg, run, saved):
            raise ConnectionError("connection refused")

    monkeypatch.setitem(fanout.BACKENDS, "mlflow", Unreachable)
    cfg = make_config("logger=[mlflow,csv]")
    parts = type("Parts", (), {"cfg": cfg, "world": type("W", (), {"main": True})(), "run_dir": tmp_path,
                               "names": ["a"], "tasks": []})()
    state = type("State", (), {"history": [], "stages": [], "info": {"config": {}}})()
    with caplog.at_level(logging.WARNING):
        trackers = fanout.open_trackers(parts, state, None)
    assert [t.name for t in trackers.trackers] == ["csv"]
    assert [r.getMessage() for r in caplog.records] == [
        "logger mlflow could not start and is off for this run (ConnectionError: connection refused)"]


def test_no_logger_opens_nothing(tmp_path):
    cfg = make_config()
    assert cfg.logger.chosen() == []
    parts = type("Parts", (), {"cfg": cfg, "world": None, "run_dir": tmp_path})()
    assert fanout.open_trackers(parts, None, None).trackers == []
    assert not (tmp_path / fanout.TRACKERS_FILE).exists()


def test_a_missing_tracker_package_is_one_line_exit_2_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracker_schema, "installed", lambda module: module != "tensorboard")
    run_dir = tmp_path / "run"
    code, lines = main_exit(["device=cpu", "logger=[csv,tensorboard]", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("cl-run: error: logger.tensorboard: needs the tensorboard package")
    assert not run_dir.exists()


def test_several_loggers_compose_and_a_bad_wandb_mode_is_named():
    assert make_config("logger=[csv,tensorboard]").logger.chosen() == ["tensorboard", "csv"]
    assert make_config("logger=many_loggers").logger.chosen() == ["tensorboard", "mlflow", "csv"]
    with pytest.raises(Exception, match="logger.wandb.mode: expected one of online, offline, disabled"):
        make_config("logger=wandb", "logger.wandb.mode=sometimes")


def test_summary_numbers_are_flattened_by_task():
    results = {"average_accuracy": 0.5, "per_task": [{"task": "a", "final": 0.25, "forgetting": None}],
               "strategy_accounting": {"extra_parameters": 3}, "note": "text"}
    assert fanout.numbers(results, "summary/") == {"summary/average_accuracy": 0.5, "summary/a/final": 0.25,
                                                   "summary/strategy_accounting/extra_parameters": 3.0}
    assert backends.markdown_table(backends.Matrix("after_a", ["a"], ["init", "after_a"], [[0.0], [None]], None))
