"""Test helpers: compose the real config (conf/) and shrink it (CPU, tiny model, few epochs); run the CLI (in a
subprocess, or its ``main`` in this process); a local three-task sequence in json files; a tree's snapshot."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from cl_runner import cli
from cl_runner.cli import CONF_DIR
from cl_runner.config.schema import Config
from cl_runner.config.validate import register_configs, validate
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


def hydra_config(*overrides: str) -> DictConfig:
    """The composed config with its ``hydra`` node (launcher, sweeper), unvalidated."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def run_quietly(cfg: Config, run_dir: Path, base_dir: Path | None = None) -> dict:
    return run(cfg, run_dir, console=Console(file=io.StringIO(), width=120), base_dir=base_dir)


def cl_run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (``python -m cl_runner`` is the console script's entry point)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "cl_runner", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def main_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """cli.main in this process: (exit status, stderr lines); it must print no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, [line for line in err.splitlines() if line.strip()]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: directories as such, files by a hash of their bytes."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# three tasks of local json files, one per kind of metric: labels, exact match, perplexity (write_local_sequence)
LOCAL_SEQUENCE = [
    {"name": "sentiment", "path": "json", "data_files": {"train": "sent_train.jsonl", "test": "sent_test.jsonl"},
     "input_column": "text", "target_column": "label", "verbalizer": {"0": "negative", "1": "positive"},
     "metric": "label_accuracy", "template": "Review: {input}\nSentiment:"},
    {"name": "qa", "path": "json", "data_files": {"train": "qa_train.jsonl", "test": "qa_test.jsonl"},
     "input_column": "question", "target_column": "answer", "metric": "exact_match"},
    {"name": "wiki", "path": "json", "data_files": {"train": "wiki_train.jsonl", "test": "wiki_test.jsonl"},
     "input_column": None, "template": "", "target_column": "text", "metric": "perplexity"},
]


def write_local_sequence(root: Path) -> None:
    """LOCAL_SEQUENCE's data files in ``root``."""
    rows = [{"text": f"the film was {w}", "label": int(w in ("great", "lovely", "fine"))}
            for w in ("great", "awful", "lovely", "dull", "fine", "bad", "great", "awful")]
    write_jsonl(root / "sent_train.jsonl", rows)
    write_jsonl(root / "sent_test.jsonl", rows[:4])
    write_jsonl(root / "qa_train.jsonl", [{"question": f"capital of land {i}?", "answer": f"city{i % 3}"}
                                          for i in range(12)])
    write_jsonl(root / "qa_test.jsonl", [{"question": f"capital of land {i}?", "answer": f"city{i % 3}"}
                                         for i in range(4)])
    (root / "wiki_train.jsonl").write_text("".join(json.dumps({"text": "a plain sentence of text " * 3}) + "\n"
                                                   for _ in range(6)))
    (root / "wiki_test.jsonl").write_text(json.dumps({"text": "a plain sentence of text"}) + "\n")
