"""The ``logger`` config group (conf/logger/): one optional section per tracker; several may be set at once.

A section left null is off. Checks are cheap (no tracker package is imported): a tracker the user asked for
whose package is missing is a config error, reported before anything runs."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, fields

EXTRA = "pip install 'cl-runner[trackers]'"


@dataclass
class TensorBoardConfig:
    dir: str | None = None  # null = <run dir>/tensorboard; a path: <path>/<run name> (a sweep: <path>/<sweep>/<job>)


@dataclass
class WandbConfig:
    project: str = "cl-runner"
    entity: str | None = None  # team or user; null = the logged-in default
    mode: str | None = None  # online | offline | disabled; null = WANDB_MODE, else online
    group: str | None = None  # null = the sweep's directory in a sweep (its jobs grouped), else no group
    name: str | None = None  # null = the run directory's name
    tags: list[str] = field(default_factory=list)
    dir: str | None = None  # where wandb/ is written; null = the run directory
    log_artifacts: bool = True  # the run's result files as an artifact when the run ends (checkpoints never)


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # null = MLFLOW_TRACKING_URI, else a file store ./mlruns in the launch directory
    experiment: str | None = None  # null = experiment_name; in a sweep <experiment_name>/<sweep directory>
    run_name: str | None = None  # null = the run directory's name
    tags: dict[str, str] = field(default_factory=dict)
    log_artifacts: bool = True  # the run's result files as artifacts when the run ends (checkpoints never)


@dataclass
class CsvConfig:
    path: str | None = None  # null = <run dir>/logged_metrics.csv (columns step, name, value, time)


PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}  # tracker -> (module to import, package to install)
WANDB_MODES = ("online", "offline", "disabled")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


@dataclass
class LoggerConfig:
    tensorboard: TensorBoardConfig | None = None
    wandb: WandbConfig | None = None
    mlflow: MlflowConfig | None = None
    csv: CsvConfig | None = None

    def chosen(self) -> list[str]:
        """The trackers configured, in a fixed order."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def errors(self, key: str) -> list[str]:
        errs: list[str] = []
        for name in self.chosen():
            module, package = PACKAGES.get(name, (None, None))
            if module and not installed(module):
                errs.append(f"{key}.{name}: needs the {package} package, which is not installed ({EXTRA}, or "
                            f"pip install {package}); or drop logger={name}")
        if self.wandb is not None and self.wandb.mode is not None and self.wandb.mode not in WANDB_MODES:
            errs.append(f"{key}.wandb.mode: expected one of {', '.join(WANDB_MODES)} or null, got {self.wandb.mode!r}")
        return errs
