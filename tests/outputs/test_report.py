"""Sweeps and cl-report: a real 4-job sweep (2 learning rates x 2 seeds) through the CLI, its sweep.json, job
directories and report (means and stds checked by hand against the jobs' metrics.json); failed jobs; the
Slurm and Optuna configs (composed, and a 2-trial Optuna search run on CPU)."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cl_run, hydra_config
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from cl_runner import report_cli
from cl_runner.cli import CONF_DIR
from cl_runner.outputs import jobs as job_files
from cl_runner.outputs import report
from cl_runner.outputs.sweep import SweepRecorder

SMALL_TASKS = [f"tasks.tasks.{i}.num_subjects=16" for i in range(3)]  # a quarter of the default facts
SWEEP_ARGS = ["-m", "train.lr=1e-3,1e-2", "seed=0,1", "device=cpu", "train.epochs=1", *SMALL_TASKS]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One real sweep for the whole module: 2 configurations x 2 seeds."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = cl_run(*SWEEP_ARGS, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    (sweep_dir,) = (cwd / "outputs" / "multirun").glob("*/*")
    return sweep_dir


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _job_metrics(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]


@pytest.mark.slow
def test_sweep_jobs_are_named_by_number_and_overrides(sweep):
    jobs = sorted((p.name for p in sweep.iterdir() if p.is_dir()), key=lambda n: int(n.split("_")[0]))
    small = ",".join(SMALL_TASKS)
    assert jobs == [f"0_device=cpu,seed=0,{small},train.epochs=1,train.lr=0.001",
                    f"1_device=cpu,seed=1,{small},train.epochs=1,train.lr=0.001",
                    f"2_device=cpu,seed=0,{small},train.epochs=1,train.lr=0.01",
                    f"3_device=cpu,seed=1,{small},train.epochs=1,train.lr=0.01"]
    for job in jobs:
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        assert f"seed={metrics['seed']}" in job and f"train.lr={metrics['config']['train']['lr']}" in job


@pytest.mark.slow
def test_sweep_json_lists_every_job_with_its_metrics(sweep):
    data = json.loads((sweep / "sweep.json").read_text())
    assert data["status"] == "completed" and data["counts"] == {"completed": 4}
    assert data["overrides"] == SWEEP_ARGS[1:]
    assert [job["num"] for job in data["jobs"]] == [0, 1, 2, 3]
    for entry in data["jobs"]:
        metrics = json.loads((sweep / entry["dir"] / "metrics.json").read_text())
        assert entry["status"] == "completed" and entry["error"] is None
        assert entry["average_accuracy"] == metrics["average_accuracy"]
        assert entry["wall_time_s"] == metrics["wall_time_s"]
        assert f"seed={metrics['seed']}" in entry["overrides"]
    assert not list(sweep.glob(".*.tmp"))


@pytest.mark.slow
def test_report_means_and_stds_match_the_jobs_by_hand(sweep, tmp_path, capsys):
    report_cli.main([str(sweep), "--out", str(tmp_path)])
    rows = _read_csv(tmp_path / "report.csv")
    assert [r["train.lr"] for r in rows] and {r["train.lr"] for r in rows} == {"0.001", "0.01"}
    assert all(r["seeds"] == "0,1" and r["runs"] == "2" and r["status"] == "completed" for r in rows)
    by_lr: dict[float, list[dict]] = {}
    for metrics in _job_metrics(sweep):
        by_lr.setdefault(metrics["config"]["train"]["lr"], []).append(metrics)
    for row in rows:
        jobs = by_lr[float(row["train.lr"])]
        assert len(jobs) == 2
        for key in ("average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer",
                    "wall_time_s"):
            a, b = jobs[0][key], jobs[1][key]
            mean = (a + b) / 2
            std = math.sqrt(((a - mean) ** 2 + (b - mean) ** 2) / (2 - 1))  # sample std over the 2 seeds
            assert float(row[f"{key}_mean"]) == pytest.approx(mean, abs=1e-12), key
            assert float(row[f"{key}_std"]) == pytest.approx(std, abs=1e-12), key
    means = [float(r["average_accuracy_mean"]) for r in rows]
    assert means == sorted(means, reverse=True)  # best first
    assert float(rows[0]["delta_average_accuracy"]) == 0.0
    printed = capsys.readouterr().out
    assert "train.lr" in printed and "±" in printed and "sorted by ACC" in printed
    markdown = (tmp_path / "report.md").read_text()
    assert "| # | strategy | train.lr | seeds | runs | ACC | Δ best |" in markdown
    assert len(_read_csv(tmp_path / "jobs.csv")) == 4


@pytest.mark.slow
def test_sort_by_forgetting_puts_the_lowest_first(sweep, tmp_path):
    built = report.build_report([sweep], "forgetting")
    assert built.metric == "average_forgetting" and not built.higher
    values = [c.stat("average_forgetting")[0] for c in built.configs]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="--sort: unknown metric 'bogus'"):
        report.build_report([sweep], "bogus")


def _assert_png(path: Path, min_px: int = 400, max_px: int = 4000) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG, path
    with Image.open(path) as image:
        width, height = image.size
    assert min_px <= width <= max_px and min_px * 0.6 <= height <= max_px, (path, image.size)


@pytest.mark.slow
def test_each_run_and_the_sweep_write_plots(sweep, tmp_path):
    for job in (p for p in sweep.iterdir() if p.is_dir()):
        _assert_png(job / "score_matrix.png")
        _assert_png(job / "learning_curves.png")
    for name in ("average_accuracy_vs_train.lr.png", "best_score_matrix.png", "best_learning_curves.png"):
        _assert_png(sweep / name)  # written by the sweep callback when the sweep ended
    assert (sweep / "report.csv").exists() and (sweep / "report.md").exists()
    written = report.write_report(report.build_report([sweep], "bwt"), tmp_path)
    assert tmp_path / "backward_transfer_vs_train.lr.png" in written
    for path in written:
        if path.suffix == ".png":
            _assert_png(path)


def _fake_job(path: Path, overrides: list[str], metrics: dict | None, strategy: str = "naive") -> Path:
    """A job directory as Hydra and run() leave it (.hydra/overrides.yaml, .hydra/config.yaml, metrics.json)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"strategy": {"name": strategy}}))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    return path


@pytest.mark.slow
def test_failed_jobs_are_listed_as_failed_with_their_error(sweep, tmp_path, capsys):
    """Two more jobs of a third configuration: one that failed (metrics.json says so), one that died before its
    first evaluation (no metrics.json; its seed comes from its overrides)."""
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    fixed = SWEEP_ARGS[3:]  # device, epochs, task sizes
    nan, died = "4_seed=0,train.lr=0.1", "5_seed=1,train.lr=0.1"
    _fake_job(copy / nan, ["train.lr=0.1", "seed=0", *fixed], {
        "status": "failed", "error": "FloatingPointError: loss is nan at step 3", "strategy": "naive", "seed": 0})
    _fake_job(copy / died, ["seed=1", "train.lr=0.1", *fixed], None)
    report_cli.main([str(copy), "--no-plots"])
    rows = {r["train.lr"]: r for r in _read_csv(copy / "report.csv")}
    assert rows["0.1"]["status"] == "failed" and rows["0.1"]["completed"] == "0" and rows["0.1"]["runs"] == "2"
    assert rows["0.1"]["average_accuracy_mean"] == "" and rows["0.1"]["rank"] == "3"  # no value: ranked last
    assert "FloatingPointError: loss is nan at step 3" in rows["0.1"]["errors"]
    assert f"{died}: {job_files.NO_METRICS}" in rows["0.1"]["errors"]
    assert rows["0.1"]["seeds"] == "0,1"
    jobs = {r["job"]: r for r in _read_csv(copy / "jobs.csv")}
    assert jobs[died]["status"] == "failed" and jobs[nan]["error"].startswith("FloatingPointError")
    printed = capsys.readouterr().out
    assert f"failed {nan}: FloatingPointError: loss is nan at step 3" in printed
    assert f"failed {died}: {job_files.NO_METRICS}" in printed
    markdown = (copy / "report.md").read_text()
    assert "## Jobs that did not complete" in markdown and "**failed**: FloatingPointError" in markdown


def test_sweep_json_records_a_job_that_raised(tmp_path):
    """The callback alone: a job whose task function raised is failed in sweep.json, with the exception."""
    sweep_dir = tmp_path / "sweep"
    run_dir = sweep_dir / "0_seed=3"
    run_dir.mkdir(parents=True)
    config = OmegaConf.create({"hydra": {
        "mode": "MULTIRUN", "sweep": {"dir": str(sweep_dir), "subdir": "0_seed=3"},
        "runtime": {"output_dir": str(run_dir)}, "job": {"num": 0}, "overrides": {"task": ["seed=3"]}}})
    from hydra.types import RunMode

    config.hydra.mode = RunMode.MULTIRUN
    recorder = SweepRecorder()
    recorder.on_job_start(config)
    assert json.loads((sweep_dir / "sweep.json").read_text())["jobs"][0]["status"] == "running"
    failed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("CUDA error: device lost\nmore"))
    recorder.on_job_end(config, failed)
    (entry,) = json.loads((sweep_dir / "sweep.json").read_text())["jobs"]
    assert entry["status"] == "failed" and entry["error"] == "RuntimeError: CUDA error: device lost"
    assert entry["dir"] == "0_seed=3" and entry["overrides"] == ["seed=3"]
    (run_dir / "metrics.json").write_text(json.dumps({"status": "completed", "average_accuracy": 0.75}))
    completed = JobReturn(status=JobStatus.COMPLETED, _return_value=None)
    recorder.on_job_end(config, completed)
    assert completed.return_value == 0.75  # handed to value-optimising sweepers (Optuna)
    data = json.loads((sweep_dir / "sweep.json").read_text())
    assert data["counts"] == {"completed": 1} and data["jobs"][0]["average_accuracy"] == 0.75
    with pytest.raises(ValueError, match="objective: expected one of"):
        SweepRecorder(objective="accuracy")


def test_strategies_compared_over_seeds_give_one_row_and_a_bar_per_strategy(tmp_path):
    accuracies = {"naive": [0.1, 0.2, 0.3], "replay": [0.5, 0.7, 0.6]}
    num = 0
    for strategy, values in accuracies.items():
        for seed, value in enumerate(values):
            metrics = {"status": "completed", "strategy": strategy, "seed": seed, "average_accuracy": value,
                       "average_forgetting": 1 - value, "wall_time_s": 1.0, "tasks": ["a", "b"],
                       "metric_per_task": ["exact_match"] * 2,
                       "stages": [{"stage": s, "scores": {"a": {"score": value}, "b": {"score": value / 2}}}
                                  for s in ("init", "after_a", "after_b")]}
            _fake_job(tmp_path / f"{num}_seed={seed},strategy={strategy}", [f"strategy={strategy}", f"seed={seed}"],
                      metrics, strategy)
            num += 1
    built = report.build_report([tmp_path])
    assert [c.strategy for c in built.configs] == ["replay", "naive"] and built.keys == []
    mean, std, n = built.configs[0].stat("average_accuracy")
    assert (mean, n) == (pytest.approx(0.6), 3) and std == pytest.approx(0.1)
    written = report.write_report(built, tmp_path / "out")
    assert tmp_path / "out" / "average_accuracy_by_strategy.png" in written
    _assert_png(tmp_path / "out" / "average_accuracy_by_strategy.png")


@pytest.mark.slow
def test_bad_paths_exit_2_with_one_line(tmp_path):
    for args, message in [([str(tmp_path / "nope")], "not a directory"), ([str(tmp_path)], "no runs found")]:
        proc = subprocess.run([sys.executable, "-m", "cl_runner.outputs.report", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ Slurm and Optuna configs
@pytest.mark.slow
def test_default_config_composes_without_the_optional_plugins(tmp_path):
    """With no Hydra plugin installed (an empty ``hydra_plugins`` namespace) the default config, its sweep layout
    and callback still compose; choosing the Slurm launcher then names the missing plugin's config."""
    code = f"""
import sys, types
sys.modules["hydra_plugins"] = types.ModuleType("hydra_plugins")
sys.modules["hydra_plugins"].__path__ = []
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from cl_runner.config.schema import register_configs
register_configs()
with initialize_config_dir({str(CONF_DIR)!r}, version_base="1.3"):
    cfg = compose("config", overrides=["seed=1"], return_hydra_config=True)
    subdir = OmegaConf.to_container(cfg.hydra.sweep)["subdir"]  # unresolved: no job number outside a sweep
    print(subdir, cfg.hydra.callbacks.sweep_record._target_, cfg.hydra.launcher._target_)
    assert not [m for m in sys.modules if "optuna" in m or "submitit" in m]
    try:
        compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    except Exception as exc:
        print(str(exc).splitlines()[0])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    composed, missing = proc.stdout.strip().splitlines()
    assert composed.split() == ["${hydra.job.num}_${hydra.job.override_dirname}",
                                "cl_runner.outputs.sweep.SweepRecorder",
                                "hydra._internal.core_plugins.basic_launcher.BasicLauncher"]
    assert "Could not load 'hydra/launcher/submitit_slurm'" in missing


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = hydra_config("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "strategy=ewc")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert str(launcher.submitit_folder).endswith("/.submitit/%j")


def test_optuna_sweeper_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    for name, searched in [("optuna_ewc", "strategy.ewc_lambda"), ("optuna_replay", "strategy.buffer_size")]:
        sweeper = hydra_config(f"hydra/sweeper={name}").hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
        assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and searched in sweeper.params


@pytest.mark.slow
def test_optuna_search_runs_two_trials_on_cpu(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = cl_run("-m", "hydra/sweeper=optuna_replay", "hydra.sweeper.n_trials=2", "device=cpu", "train.epochs=1",
                  *SMALL_TASKS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    data = json.loads((sweep_dir / "sweep.json").read_text())
    assert data["counts"] == {"completed": 2} and data["sweeper"].endswith("OptunaSweeper")
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(job["average_accuracy"] for job in data["jobs"])
    rows = _read_csv(sweep_dir / "report.csv")
    assert len(rows) == 2 and {"strategy.buffer_size", "strategy.replay_ratio"} <= set(rows[0])
