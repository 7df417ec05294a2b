"""Test helpers: compose the real config (conf/) and shrink it (CPU, tiny model, few epochs); run the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console

from cl_runner.cli import CONF_DIR
from cl_runner.config.schema import Config, register_configs, validate
from cl_runner.engine.run import run

REPO = Path(__file__).resolve().parent.parent
register_configs()

SMALL = ["device=cpu", "train.epochs=2", "train.eval_batch_size=64"]


def make_config(*overrides: str, small: bool = True, tasks: list[dict] | None = None) -> Config:
    """The real composed config with ``overrides`` (and the shrinking overrides unless small=False);
    ``tasks`` replaces the task list (handier than Hydra's override grammar for nested dicts)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*(SMALL if small else []), *overrides])
    if tasks is not None:
        cfg.tasks = OmegaConf.merge(cfg.tasks, {"tasks": tasks})
    return validate(cfg)


def run_quietly(cfg: Config, run_dir: Path, base_dir: Path | None = None) -> dict:
    return run(cfg, run_dir, console=Console(file=io.StringIO(), width=120), base_dir=base_dir)


def cl_run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (``python -m cl_runner`` is the console script's entry point)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "cl_runner", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
