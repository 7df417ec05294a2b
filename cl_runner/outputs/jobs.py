"""Reading finished (or unfinished) runs back from disk: a run directory as a ``Job`` (its overrides, its
metrics.json, its matrix), found under any folder of runs or sweeps. What cl-report, the paper comparison and the
sweep summary all read."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NO_METRICS = "no metrics.json (job died before its first evaluation)"
SWEEP_FILE = "sweep.json"  # at the root of a multirun: its jobs (cl_runner/outputs/sweep.py keeps it)


# --------------------------------------------------------------------------------------------------- reading
@dataclass
class Job:
    """One run directory: a single run, or one job of a sweep."""

    path: Path
    name: str  # the directory, relative to the PATH it was found under
    status: str  # completed | failed | running | interrupted
    error: str | None
    strategy: str
    seed: int | None
    overrides: list[str]  # as typed for this job (Hydra's .hydra/overrides.yaml), seed included
    metrics: dict[str, Any]  # contents of metrics.json ({} when there is none)
    config: dict[str, Any] = field(default_factory=dict)  # the config it ran with (config.yaml, resolved)
    choices: dict[str, Any] = field(default_factory=dict)  # config group -> option (.hydra/hydra.yaml)

    @property
    def configuration(self) -> tuple[str, ...]:
        return tuple(o for o in self.overrides if override_key(o) != "seed")

    def value(self, metric: str) -> float | None:
        """A number of metrics.json; a dotted name reads a nested one (``cost.train_seconds``)."""
        value: Any = self.metrics
        for key in metric.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    def setting(self, key: str) -> str:
        """What the job ran with for an override key, whether it was typed or came from a default or an
        experiment file: a config group's option, else the value in its config, else the typed value."""
        if key in self.choices:
            return _text(self.choices[key])
        value: Any = self.config
        for part in key.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                typed = [override_value(o) for o in self.overrides if override_key(o) == key]
                return typed[-1] if typed else ""
        return _text(value)

    def score_rows(self) -> list[list[float]] | None:
        """The score matrix with its init row (stages x tasks), or None when the run has no stages."""
        tasks, stages = self.metrics.get("tasks"), self.metrics.get("stages")
        if not tasks or not stages:
            return None
        return [[stage["scores"][name]["score"] for name in tasks] for stage in stages]


def _text(value: Any) -> str:
    """A config value as an override would spell it (true, null; a list or mapping as JSON)."""
    if isinstance(value, str):
        return value
    plain = value is None or isinstance(value, bool | list | dict)
    return json.dumps(value, ensure_ascii=False) if plain else str(value)


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra" / "overrides.yaml").is_file()


def _natural(path: Path) -> tuple:
    number = re.match(r"\d+", path.name)
    return (int(number.group()) if number else math.inf, path.name)


def is_sweep_dir(path: Path) -> bool:
    """A multirun's directory: ``sweep.json`` (cl-run's), or Hydra's ``multirun.yaml``."""
    return (path / SWEEP_FILE).is_file() or (path / "multirun.yaml").is_file()


def sweep_job_dirs(path: Path) -> list[Path] | None:
    """The job directories a sweep's ``sweep.json`` lists (job number order), or None without a readable one."""
    try:
        entries = json.loads((path / SWEEP_FILE).read_text(encoding="utf-8"))["jobs"]
        listed = [path / entry["dir"] for entry in sorted(entries, key=lambda e: e["num"])]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    inside = path.resolve()
    return [d for d in listed if d.is_dir() and d.resolve().is_relative_to(inside) and d.resolve() != inside]


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` itself when it is a run; a sweep's own jobs (as its sweep.json lists them, not other runs kept in
    its folder); else every run below it (job number order; hidden folders skipped)."""
    if is_run_dir(path):
        return [path]
    listed = sweep_job_dirs(path)
    if listed is not None:
        return listed
    found: list[Path] = []
    for child in sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural):
        found.extend(find_run_dirs(child))
    return found


def read_job(run_dir: Path, root: Path | None = None) -> Job:
    """What a run directory says about its job. A directory without metrics.json is a failed job."""
    run_dir = Path(run_dir)
    overrides = _load_yaml(run_dir / ".hydra" / "overrides.yaml")
    overrides = overrides if isinstance(overrides, list) else []
    config = _load_yaml(run_dir / "config.yaml") or _load_yaml(run_dir / ".hydra" / "config.yaml")
    config = config if isinstance(config, dict) else {}
    hydra = _load_yaml(run_dir / ".hydra" / "hydra.yaml")
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") if isinstance(hydra, dict) else None
    metrics: dict[str, Any] = {}
    error = None
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        status = metrics.get("status") or "running"
        error = metrics.get("error")
        if status == "running" and owner_gone(run_dir):
            status, error = "interrupted", "killed: metrics.json says running, but no cl-run holds the run's lock"
    except FileNotFoundError:
        status, error = "failed", NO_METRICS
    except (OSError, ValueError) as exc:
        status, error = "failed", f"metrics.json unreadable ({exc})"
    settings = {override_key(o): override_value(o) for o in overrides}
    strategy_config = config.get("strategy") if isinstance(config.get("strategy"), dict) else {}
    strategy = metrics.get("strategy") or strategy_config.get("name") or settings.get("strategy") or "?"
    seed = metrics.get("seed", config.get("seed"))
    if seed is None and "seed" in settings:
        seed = int(settings["seed"]) if settings["seed"].lstrip("-").isdigit() else None
    name = run_dir.name if root is None or run_dir == root else run_dir.relative_to(root).as_posix()
    return Job(run_dir, name, status, error, strategy, seed, [str(o) for o in overrides], metrics, config,
               choices if isinstance(choices, dict) else {})


def owner_gone(run_dir: Path) -> bool:
    """Whether the run's ``.lock`` exists and no process holds it: its cl-run (rank 0 under torchrun) was killed
    before it could record how it ended. The probe is a shared lock, let go at once; a cl-run starting in the very
    same instant could be refused as "in use" and is simply started again."""
    import fcntl

    try:
        with open(Path(run_dir) / ".lock") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True
    except OSError:
        return False


def check_paths(paths: list[Path]) -> None:
    """ValueError (one line, naming the path) unless every path is a directory holding at least one run."""
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"{path}: not a directory" if path.exists() else f"{path}: no such directory")
        if not find_run_dirs(path):
            raise ValueError(f"{path}: no runs found (a run directory holds metrics.json or .hydra/overrides.yaml)")


def read_jobs(paths: list[Path]) -> list[Job]:
    jobs = []
    for root in paths:
        for run_dir in find_run_dirs(root):
            job = read_job(run_dir, root)
            if len(paths) > 1:
                job.name = f"{root.name}/{job.name}" if run_dir != root else root.name
            jobs.append(job)
    return jobs

