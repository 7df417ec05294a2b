"""Hydra's side of a cl-run job: a single run run as Hydra's run mode runs one (``Hydra.run``: callbacks, the job
directory, job logging), but on the config preflight already composed and validated instead of composing it again;
and Hydra's ``.hydra/*.yaml`` files, written only once the run is known to proceed."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_single_job(composed, loader, task: Callable[[Any], Any]) -> Any:
    """``task(job config)`` in Hydra's run mode: ``composed`` is the job's config with its ``hydra`` node (from
    preflight), ``loader`` the config loader that composed it. Returns what the task returned; what it raised is
    reported as Hydra reports it (a traceback without Hydra's frames, exit 1; a SystemExit goes straight through)."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.utils import run_and_report
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext

    def run() -> Any:
        configure_log(composed.hydra.hydra_logging, composed.hydra.verbose)  # as Hydra.run's composition does
        callbacks = Callbacks(composed)
        callbacks.on_run_start(config=composed, config_name="config")
        ended = run_job(hydra_context=HydraContext(config_loader=loader, callbacks=callbacks), task_function=task,
                        config=composed, job_dir_key="hydra.run.dir", job_subdir_key=None)
        callbacks.on_run_end(config=composed, config_name="config", job_return=ended)
        return ended.return_value  # raises what the task raised

    return run_and_report(run)


def pin(composed, key: str, value: str) -> None:
    """Set ``key`` of a single run's composed ``hydra`` node (read-only once composed) to ``value``, recorded among
    Hydra's own overrides as the override it stands for (before ``hydra.mode=RUN``, which Hydra adds last)."""
    from omegaconf import OmegaConf, open_dict, read_write

    with read_write(composed.hydra), open_dict(composed.hydra):
        OmegaConf.update(composed, key, value, merge=False)
        given = composed.hydra.overrides.hydra
        given.insert(len(given) - 1, f"{key}={value}")


def write_hydra_files(task_cfg, run_dir: Path, resume: bool) -> None:
    """Hydra's ``.hydra/{config,hydra,overrides}.yaml``, as Hydra writes them, once the run is known to proceed
    (conf/hydra/default.yaml sets ``hydra.output_subdir: null`` so that Hydra does not write them before). A
    continued run keeps those of its first start."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, read_write

    from cl_runner.core.files import write_atomic

    out = run_dir / ".hydra"
    if resume and (out / "overrides.yaml").exists():
        return
    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    with read_write(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = ".hydra"  # where they are, as in a plain Hydra run
    for name, node in (("config.yaml", task_cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        write_atomic(out / name, OmegaConf.to_yaml(node))
