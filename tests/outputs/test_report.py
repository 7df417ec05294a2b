"""Sweeps and cl-report: a real 4-job sweep (2 learning rates x 2 seeds) through the CLI, its sweep.json, job
directories and report (means and stds checked by hand against the jobs' metrics.json); failed jobs; the
Slurm and Optuna configs (composed, and a 2-trial Optuna search run on CPU)."""

import csv
import io
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
from rich.console import Console

from cl_runner import report_cli
from cl_runner.cli import CONF_DIR
from cl_runner.outputs import jobs as job_files
from cl_runner.outputs import report
from cl_runner.outputs.sweep import SweepRecorder, update_sweep_file

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
    for num, name in ((4, nan), (5, died)):  # jobs of the sweep, as the callback records them when they start
        update_sweep_file(copy, lambda data, n=num, d=name: data["jobs"].append(
            {"num": n, "dir": d, "overrides": [], "status": "running", "error": None}))
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
    """The program itself (the bad-input catalogue, tests/cli/test_bad_inputs.py, has the cases in-process)."""
    for args, message in [([str(tmp_path / "nope")], "no such directory"), ([str(tmp_path)], "no runs found")]:
        proc = subprocess.run([sys.executable, "-m", "cl_runner.report_cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert proc.stdout == ""


# ------------------------------------------------------------------------------------ where the files go, what shows
def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _run(root: Path, name: str, typed: list[str], config: dict, choices: dict, metrics: dict) -> Path:
    """A run directory as cl-run leaves it: what was typed, the resolved config, the group choices, the metrics."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(typed))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (run / "metrics.json").write_text(json.dumps({"status": "completed", "seed": 0} | metrics))
    return run


NINE = ["naive", "replay", "ewc", "der", "lwf", "agem", "adapters", "si", "mas"]


def nine_runs(root: Path) -> None:
    """Issue 27's nine runs of a 135M model, each in its own folder: the same model and tasks typed every time, EWC
    with two options of its own, the learning rate typed in some runs and taken from an experiment file in the
    others (the same value), every number as wide as a real run's."""
    for i, name in enumerate(NINE):
        typed = ["model.name_or_path=/data/models/SmolLM2-135M", "tasks=my_tasks", f"strategy={name}"]
        options = {"name": name} | ({"fisher_batch_size": 4, "fisher_samples": 32} if name == "ewc" else {})
        typed += [f"strategy.{k}={v}" for k, v in options.items() if k != "name"]
        typed += ["train.lr=1e-4"] if i % 2 else ["experiment=smollm"]
        config = {"model": {"name_or_path": "/data/models/SmolLM2-135M"}, "strategy": options,
                  "train": {"lr": 0.0001, "epochs": 1}, "seed": 0}
        choices = {"experiment": None if i % 2 else "smollm", "model": "tiny", "tasks": "my_tasks", "strategy": name}
        big = 134_515_008
        cost = {"trainable_parameters": 921_600 if name == "adapters" else big, "extra_parameters": big * (i % 3),
                "peak_cpu_rss_bytes": int((3.1 + 1.1 * i) * 2**30), "peak_cuda_allocated_bytes": None,
                "train_seconds": 1500.4 + 80.1 * i, "eval_seconds": 301.7 + 9.2 * i, "tokens_seen": 1_254_400}
        _run(root, f"2026-12-0{i + 1}/10-00-00", typed, config, choices, {
            "strategy": name, "average_accuracy": 0.3 + 0.037 * i, "average_forgetting": 0.41 - 0.03 * i,
            "backward_transfer": -0.41 + 0.03 * i, "forward_transfer": 0.012 * i, "wall_time_s": 1834.2 + 97.3 * i,
            "cost": cost})


def test_nine_runs_fit_a_160_column_terminal_and_the_csv_keeps_every_column(tmp_path):
    nine_runs(tmp_path / "runs")
    built = report.build_report([tmp_path / "runs"])
    terminal = Console(file=io.StringIO(), width=160, force_terminal=True, color_system=None)
    report.print_report(built, terminal)
    printed = terminal.file.getvalue()
    assert max(len(line) for line in printed.splitlines()) <= 160, printed
    header = next(line for line in printed.splitlines() if line.startswith("┃"))
    ewc = next(i for i, line in enumerate(printed.splitlines()) if "│ ewc " in line)
    assert "fisher_batch_size=4" in "".join(printed.splitlines()[ewc:ewc + 3])  # one strategy's option: its cell
    assert "fisher" not in header
    for column in ("seeds", "runs", "status", "tokens", "train.lr", "model.name_or_path"):
        assert column not in header, column  # the same in every row: said once, below the table
    assert "same in every row: seeds 0 · runs 1 · tokens 1.3M · status completed" in printed
    for column in ("experiment", "forgetting", "FWT", "trainable", "peak RSS", "train (s)"):
        assert column in header, column  # differ between rows
    report.write_report(built, tmp_path / "out", with_plots=False)
    rows = _read_csv(tmp_path / "out" / "report.csv")
    assert len(rows) == 9 and {"seeds", "runs", "status", "strategy.fisher_batch_size", "strategy.fisher_samples",
                               "experiment", "forward_transfer_mean", "cost.tokens_seen_mean"} <= set(rows[0])
    assert {r["strategy.fisher_batch_size"] for r in rows} == {"4", ""}
    assert "| # | strategy | experiment | strategy.fisher_batch_size |" in (tmp_path / "out" / "report.md").read_text()


def test_a_value_from_an_experiment_file_is_filled_in_like_a_typed_one(tmp_path):
    """train.lr typed in one run and set by an experiment file in another: both rows show it (from the run's
    config.yaml), the experiment file's name in its own column."""
    for name, typed, lr, experiment in (("typed", ["train.lr=1e-4"], 0.0001, None),
                                        ("from_file", ["experiment=mine"], 0.0001, "mine"),
                                        ("other", ["train.lr=0.01"], 0.01, None)):
        _run(tmp_path, name, typed, {"strategy": {"name": "naive"}, "train": {"lr": lr}}, {"experiment": experiment},
             {"strategy": "naive", "average_accuracy": {"typed": 0.5, "from_file": 0.4, "other": 0.9}[name]})
    built = report.build_report([tmp_path])
    assert sorted(built.keys) == ["experiment", "train.lr"]
    rows = {row["rank"]: (row["train.lr"], row["experiment"]) for row in report.summary_rows(
        built.configs, built.keys, built.metric)}
    assert rows == {1: ("0.01", "null"), 2: ("0.0001", "null"), 3: ("0.0001", "mine")}


def test_a_typed_default_and_the_default_itself_are_one_configuration(tmp_path):
    """Seed 0 typed train.lr=0.003 (the default), seed 1 did not: one row, the mean of both; a run that also
    typed no lr but another strategy option is a row of its own."""
    for seed, typed, buffer in ((0, ["train.lr=0.003", "seed=0"], 200), (1, ["seed=1"], 200),
                                (0, ["strategy.buffer_size=50", "seed=0"], 50)):
        _run(tmp_path, f"{seed}_{buffer}", typed,
             {"strategy": {"name": "replay", "buffer_size": buffer}, "train": {"lr": 0.003}, "seed": seed}, {},
             {"strategy": "replay", "seed": seed, "average_accuracy": 0.4 + seed / 10 + (buffer == 50) / 2})
    built = report.build_report([tmp_path])
    assert built.keys == ["strategy.buffer_size"]  # train.lr is 0.003 everywhere, typed or not
    best, merged = built.configs
    assert best.settings == {"train.lr": "0.003", "strategy.buffer_size": "50"} and len(best.jobs) == 1
    assert merged.settings == {"train.lr": "0.003", "strategy.buffer_size": "200"}
    assert sorted(j.name for j in merged.jobs) == ["0_200", "1_200"]
    assert merged.stat("average_accuracy") == (pytest.approx(0.45), pytest.approx(0.0707, abs=1e-4), 2)


def _sweep(root: Path, jobs: dict[str, float]) -> Path:
    """A sweep directory as cl-run leaves it: its jobs in sweep.json, Hydra's multirun.yaml."""
    for num, (name, accuracy) in enumerate(jobs.items()):
        _run(root, name, [f"seed={num}"], {"strategy": {"name": "naive"}, "seed": num}, {},
             {"strategy": "naive", "seed": num, "average_accuracy": accuracy})
    entries = [{"num": num, "dir": name, "status": "completed"} for num, name in enumerate(jobs)]
    (root / "sweep.json").write_text(json.dumps({"status": "completed", "jobs": entries}))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_a_sweep_reports_its_own_jobs_only(tmp_path, capsys):
    """Runs kept in a sweep's folder that its sweep.json does not list (a copy, a single run started there) are
    not its jobs; a folder holding the sweep sees the same jobs."""
    sweep = _sweep(tmp_path / "sweep", {"0_seed=0": 0.5, "1_seed=1": 0.7})
    _run(sweep, "extra_run", ["seed=9"], {"strategy": {"name": "naive"}}, {}, {"strategy": "naive",
                                                                              "average_accuracy": 0.1})
    _run(sweep / "1_seed=1", "nested", [], {}, {}, {})  # never read: a run directory is not searched below
    for path in (sweep, tmp_path):
        built = report.build_report([path])
        assert sorted(j.path.name for j in built.jobs) == ["0_seed=0", "1_seed=1"], path
    report_cli.main([str(sweep), "--no-plots"])
    assert "written to" in capsys.readouterr().out
    assert len(_read_csv(sweep / "jobs.csv")) == 2
    (sweep / "sweep.json").write_text("{not json")  # unreadable: every run below counts, as without one
    assert len(report.build_report([sweep]).jobs) == 3


def test_report_files_go_into_out_or_the_one_sweep_or_run_and_nowhere_else(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    _sweep(runs / "sweep", {"0_seed=0": 0.5, "1_seed=1": 0.7})
    single = _run(runs, "single", [], {"strategy": {"name": "naive"}}, {}, {"strategy": "naive",
                                                                           "average_accuracy": 0.2})
    before = _tree(tmp_path)
    for args in ([str(runs)], [str(runs / "sweep"), str(single)], ["--paper", str(runs)]):
        report_cli.main([*args, "--no-plots"] if "--paper" not in args else args)
        assert _tree(tmp_path) == before, args  # a folder of runs or several paths: printed, nothing written
        assert "not written:" in capsys.readouterr().out
    report_cli.main([str(runs), "--out", str(tmp_path / "new" / "report"), "--no-plots"])
    assert sorted(p.name for p in (tmp_path / "new" / "report").iterdir()) == ["jobs.csv", "report.csv", "report.md"]
    report_cli.main([str(single), "--no-plots"])
    assert (single / "report.csv").is_file()
    report_cli.main(["--paper", str(runs / "sweep")])
    assert (runs / "sweep" / "reproduction.md").read_text() in capsys.readouterr().out
    out = tmp_path / "new" / "report"
    report_cli.main([str(runs / "sweep"), "--out", str(out), "--no-plots"])  # an existing --out: files replaced
    assert len(_read_csv(out / "jobs.csv")) == 2


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
from rich.console import Console
from cl_runner.config.validate import register_configs
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
