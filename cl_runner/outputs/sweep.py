"""``sweep.json`` at the root of a multirun, kept by a Hydra callback (registered in conf/hydra/default.yaml).

Every job's entry (overrides, status, error, summary metrics) is written as the job starts and ends, so a sweep
in progress, here or spread over a Slurm cluster, can be read at any time; the file is replaced whole under a
lock, since jobs on several machines may finish at once. When the sweep ends, its cl-report table and plots are
written beside it. The callback also hands each finished job's objective to sweepers that optimise a value
(Optuna) when the task function returned none."""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from cl_runner.core.files import write_atomic
from cl_runner.outputs.jobs import SWEEP_FILE, Job, read_job
from cl_runner.outputs.report import RUN_METRICS, build_report, print_report, write_report

log = logging.getLogger(__name__)
KEY_ORDER = ["status", "started", "finished", "overrides", "sweeper", "launcher", "objective", "counts", "jobs"]


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def job_entry(job: Job, num: int, overrides: list[str]) -> dict[str, Any]:
    return {"num": num, "dir": job.name, "overrides": overrides, "status": job.status, "error": job.error,
            "strategy": job.strategy, "seed": job.seed, **{name: job.value(name) for name in RUN_METRICS}}


@contextmanager
def _locked(sweep_dir: Path):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / f".{SWEEP_FILE}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_sweep_file(sweep_dir: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read sweep.json (or start one), apply ``change``, recount, and write it back whole."""
    path = sweep_dir / SWEEP_FILE
    with _locked(sweep_dir):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            data = {"status": "running", "jobs": []}
        change(data)
        data["jobs"].sort(key=lambda entry: entry["num"])
        data["counts"] = {s: sum(e["status"] == s for e in data["jobs"]) for s in
                          dict.fromkeys(e["status"] for e in data["jobs"])}
        data = {k: data[k] for k in KEY_ORDER if k in data} | {k: v for k, v in data.items() if k not in KEY_ORDER}
        write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
    return data


def _upsert(entry: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["jobs"] = [e for e in data["jobs"] if e["num"] != entry["num"]] + [entry]

    return change


class SweepRecorder(Callback):
    """Hydra callback: keeps ``<sweep dir>/sweep.json``; writes the report when the sweep ends.

    objective: the metrics.json key returned to a value-optimising sweeper (Optuna) for a completed job.
    report: write report.csv / report.md / jobs.csv / plots into the sweep directory at the end, and print it.
    """

    def __init__(self, objective: str = "average_accuracy", report: bool = True) -> None:
        if objective not in RUN_METRICS:
            raise ValueError(f"hydra.callbacks.sweep_record.objective: expected one of {', '.join(RUN_METRICS)}, "
                             f"got {objective!r}")
        self.objective, self.report = objective, report

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        overrides = list(OmegaConf.to_container(config.hydra.overrides.task))

        def start(data: dict[str, Any]) -> None:  # a sweep started again in the same directory keeps its jobs
            data.update({"status": "running", "started": _now(), "finished": None, "overrides": overrides,
                         "sweeper": config.hydra.sweeper.get("_target_"),
                         "launcher": config.hydra.launcher.get("_target_"), "objective": self.objective})

        update_sweep_file(sweep_dir, start)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir, sweep_dir = _job_dirs(config)
        entry = {"num": config.hydra.job.num, "dir": run_dir.relative_to(sweep_dir).as_posix(),
                 "overrides": list(config.hydra.overrides.task), "status": "running", "error": None}
        update_sweep_file(sweep_dir, _upsert(entry))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir, sweep_dir = _job_dirs(config)
        job = read_job(run_dir, sweep_dir)
        if job_return.status == JobStatus.FAILED:  # the task function raised: metrics.json may not say so
            try:
                job_return.return_value  # noqa: B018 - re-raises the job's exception
            except Exception as exc:
                first_line = (str(exc).strip().splitlines() or [""])[0]
                job.status, job.error = "failed", f"{type(exc).__name__}: {first_line}".rstrip(": ")
        elif job.status == "completed" and job_return.return_value is None:
            job_return.return_value = job.value(self.objective)
        update_sweep_file(sweep_dir, _upsert(job_entry(job, config.hydra.job.num,
                                                       list(config.hydra.overrides.task))))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()

        def finish(data: dict[str, Any]) -> None:
            done = all(e["status"] == "completed" for e in data["jobs"])
            data.update({"status": "completed" if done else "failed", "finished": _now()})

        data = update_sweep_file(sweep_dir, finish)
        if data["status"] != "completed":
            log.warning("sweep %s: %s", sweep_dir, ", ".join(f"{n} {s}" for s, n in data["counts"].items()))
        if self.report:
            _write_report(sweep_dir, self.objective)


def _job_dirs(config: DictConfig) -> tuple[Path, Path]:
    """(job directory, sweep directory), both absolute and independent of the working directory."""
    run_dir = Path(config.hydra.runtime.output_dir)
    depth = len(Path(str(config.hydra.sweep.subdir)).parts)
    return run_dir, run_dir.parents[depth - 1]


def _write_report(sweep_dir: Path, metric: str) -> None:
    try:
        report = build_report([sweep_dir], metric)
        print_report(report, Console())
        written = write_report(report, sweep_dir)
        log.info("sweep report in %s: %s", sweep_dir, ", ".join(p.name for p in written))
    except Exception as exc:  # the jobs' results stand without their summary
        log.warning("the sweep report was not written: %s: %s (run cl-report %s)", type(exc).__name__, exc,
                    sweep_dir)
