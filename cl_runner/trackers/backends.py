"""One small class per tracker, each through the tracker's own client. Every tracker package is imported inside
its class, so a run without that tracker never pays for (or needs) the import."""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_runner.core.files import write_atomic
from cl_runner.trackers.schema import CsvConfig, MlflowConfig, TensorBoardConfig, WandbConfig


@dataclass
class TrackedRun:
    """What every tracker is told about the run it records."""

    run_dir: Path
    name: str  # the run directory's name: the tracker run's name unless configured
    group: str | None  # the sweep directory in a sweep (its jobs are grouped), else None
    experiment_name: str
    config: dict[str, Any]
    purge_step: int | None  # continued run: values logged at this global step and later are logged again


@dataclass
class Matrix:
    """The score matrix after a stage, as trackers show it."""

    stage: str
    task_names: list[str]
    stage_names: list[str]
    rows: list[list[float | None]]
    png: Path | None  # the heatmap (cl_runner/outputs/plots.py), for trackers that take images


class Tracker:
    """A tracker's methods, called by name by the fan-out (fanout.Trackers); each is a no-op here."""

    name = ""
    takes_images = False

    def ids(self) -> dict[str, Any]:
        """What trackers.json keeps so that a continued run logs into the same tracker run."""
        return {}

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def matrix(self, matrix: Matrix, step: int) -> None: ...

    def summary(self, values: dict[str, float], step: int) -> None: ...

    def artifacts(self, files: list[Path], root: Path) -> None: ...

    def close(self, status: str, error: str | None) -> None: ...


def markdown_table(matrix: Matrix) -> str:
    lines = ["| stage | " + " | ".join(matrix.task_names) + " |", "|---" * (len(matrix.task_names) + 1) + "|"]
    for stage, row in zip(matrix.stage_names, matrix.rows, strict=True):
        lines.append(f"| {stage} | " + " | ".join("" if v is None else f"{v:.4g}" for v in row) + " |")
    return "\n".join(lines)


class TensorBoardTracker(Tracker):
    """Event files through torch's SummaryWriter; a continued run purges what it logs again (``purge_step``)."""

    name, takes_images = "tensorboard", True

    def __init__(self, cfg: TensorBoardConfig, run: TrackedRun, saved: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = saved.get("dir") or str(self._dir(cfg, run))
        self.writer = SummaryWriter(self.dir, purge_step=run.purge_step)
        if run.purge_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(run.config, indent=2) + "\n```", 0)

    @staticmethod
    def _dir(cfg: TensorBoardConfig, run: TrackedRun) -> Path:
        if cfg.dir is None:
            return run.run_dir / "tensorboard"
        return Path(cfg.dir).absolute() / (run.group or "").strip("/") / run.name

    def ids(self) -> dict[str, Any]:
        return {"dir": self.dir}

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def matrix(self, matrix: Matrix, step: int) -> None:
        self.writer.add_text("score_matrix", markdown_table(matrix), step)
        if matrix.png is not None:
            from matplotlib.image import imread

            self.writer.add_image("score_matrix", imread(matrix.png)[..., :3], step, dataformats="HWC")

    def summary(self, values: dict[str, float], step: int) -> None:
        self.scalars(values, step)

    def close(self, status: str, error: str | None) -> None:
        self.writer.add_text("status", status + (f": {error}" if error else ""))
        self.writer.close()


MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value)[:6000]  # MLflow's longest parameter value
    return out


class MlflowTracker(Tracker):
    """A run in an MLflow tracking store (a local file store by default) through MlflowClient."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, run: TrackedRun, saved: dict[str, Any]) -> None:
        self.uri = saved.get("tracking_uri") or self._uri(cfg)
        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the user asked for a file store
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a server down costs seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        self.client, self.log_files = MlflowClient(tracking_uri=self.uri), cfg.log_artifacts
        self.run_id = saved.get("run_id")
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self._start(cfg, run)

    def _start(self, cfg: MlflowConfig, run: TrackedRun) -> str:
        """A new MLflow run with the config as parameters (dotted keys) and as config.json."""
        from mlflow.entities import Param

        tags = {"cl_runner.run_dir": str(run.run_dir), **({"cl_runner.outputs.sweep": run.group} if run.group else {}),
                **cfg.tags}
        group = (run.group or "").strip("/")
        experiment = self._experiment(cfg.experiment or "/".join(filter(None, [run.experiment_name, group])))
        run_id = self.client.create_run(experiment, run_name=cfg.run_name or run.name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in _flat(run.config).items()]
        for i in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(run_id, params=params[i:i + MLFLOW_BATCH])
        self.client.log_dict(run_id, run.config, "config.json")
        return run_id

    @staticmethod
    def _uri(cfg: MlflowConfig) -> str:
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
        return uri if ":" in uri else Path(uri).absolute().as_uri()  # a plain path: a file store

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of the sweep created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def ids(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "run_id": self.run_id}

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def matrix(self, matrix: Matrix, step: int) -> None:
        table = {"stages": matrix.stage_names, "tasks": matrix.task_names, "rows": matrix.rows}
        self.client.log_dict(self.run_id, table, f"score_matrix/{step:08d}_{matrix.stage}.json")
        if matrix.png is not None:
            self.client.log_artifact(self.run_id, str(matrix.png), "score_matrix")

    def summary(self, values: dict[str, float], step: int) -> None:
        self.scalars(values, step)

    def artifacts(self, files: list[Path], root: Path) -> None:
        for path in files if self.log_files else ():
            parent = path.parent.relative_to(root).as_posix()
            self.client.log_artifact(self.run_id, str(path), "run" if parent == "." else f"run/{parent}")

    def close(self, status: str, error: str | None) -> None:
        self.client.set_tag(self.run_id, "cl_runner.status", status)
        if error:
            self.client.set_tag(self.run_id, "cl_runner.error", error[:5000])
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))


class WandbTracker(Tracker):
    """A Weights & Biases run (online or offline); every value is plotted against ``global_step``."""

    name, takes_images = "wandb", True

    def __init__(self, cfg: WandbConfig, run: TrackedRun, saved: dict[str, Any]) -> None:
        import wandb

        self.wandb, self.log_files = wandb, cfg.log_artifacts
        self.id = saved.get("id") or secrets.token_hex(4)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group or run.group,
            name=cfg.name or run.name, tags=cfg.tags or None, dir=str(Path(cfg.dir or run.run_dir).absolute()),
            id=self.id, resume="allow", config=run.config, reinit="create_new",
            settings=wandb.Settings(console="off"))  # the run's own console output stays as it is
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def ids(self) -> dict[str, Any]:
        return {"id": self.id}

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "global_step": step})

    def matrix(self, matrix: Matrix, step: int) -> None:
        data = [[stage, *row] for stage, row in zip(matrix.stage_names, matrix.rows, strict=True)]
        logged: dict[str, Any] = {"score_matrix_table": self.wandb.Table(columns=["stage", *matrix.task_names],
                                                                        data=data)}
        if matrix.png is not None:
            logged["score_matrix"] = self.wandb.Image(str(matrix.png), caption=matrix.stage)
        self.run.log({**logged, "global_step": step})

    def summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def artifacts(self, files: list[Path], root: Path) -> None:
        if not self.log_files:
            return
        artifact = self.wandb.Artifact(f"run-{self.id}", type="cl-run")
        for path in files:
            artifact.add_file(str(path), name=path.relative_to(root).as_posix())
        self.run.log_artifact(artifact)

    def close(self, status: str, error: str | None) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "completed" else 1)


CSV_COLUMNS = ["step", "name", "value", "time"]


class CsvTracker(Tracker):
    """Every value as a line ``step,name,value,time`` of one CSV file; a continued run first drops the lines it
    logs again (step >= the purge step)."""

    name = "csv"

    def __init__(self, cfg: CsvConfig, run: TrackedRun, saved: dict[str, Any]) -> None:
        self.path = Path(saved.get("path") or run.run_dir / (cfg.path or "logged_metrics.csv"))
        if run.purge_step is not None and self.path.exists():
            with self.path.open(newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if row["step"] and int(row["step"]) < run.purge_step]
            self._rewrite(kept)
        elif not self.path.exists():
            self._rewrite([])

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, buffer.getvalue())

    def ids(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def _append(self, rows: list[list[Any]]) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(rows)

    def scalars(self, values: dict[str, float], step: int) -> None:
        now = round(time.time(), 3)
        self._append([[step, key, value, now] for key, value in values.items()])

    def summary(self, values: dict[str, float], step: int) -> None:
        self.scalars(values, step)

    def close(self, status: str, error: str | None) -> None:
        self._append([["", "status", status, round(time.time(), 3)]])


BACKENDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                      "mlflow": MlflowTracker, "csv": CsvTracker}
