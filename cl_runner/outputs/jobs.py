"""Reading finished (or unfinished) runs back from disk: a run directory as a ``Job`` (its overrides, its
metrics.json, its matrix), found under any folder of runs or sweeps. What cl-report, the paper comparison and the
sweep summary all read."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NO_METRICS = "no metrics.json (job died before its first evaluation)"

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

    def score_rows(self) -> list[list[float]] | None:
        """The score matrix with its init row (stages x tasks), or None when the run has no stages."""
        tasks, stages = self.metrics.get("tasks"), self.metrics.get("stages")
        if not tasks or not stages:
            return None
        return [[stage["scores"][name]["score"] for name in tasks] for stage in stages]


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


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` itself when it is a run, else every run below it (job number order; hidden folders skipped)."""
    if is_run_dir(path):
        return [path]
    found: list[Path] = []
    for child in sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural):
        found.extend(find_run_dirs(child))
    return found


def read_job(run_dir: Path, root: Path | None = None) -> Job:
    """What a run directory says about its job. A directory without metrics.json is a failed job."""
    run_dir = Path(run_dir)
    overrides = _load_yaml(run_dir / ".hydra" / "overrides.yaml")
    overrides = overrides if isinstance(overrides, list) else []
    config = _load_yaml(run_dir / ".hydra" / "config.yaml") or _load_yaml(run_dir / "config.yaml")
    config = config if isinstance(config, dict) else {}
    metrics: dict[str, Any] = {}
    error = None
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        status = metrics.get("status") or "running"
        error = metrics.get("error")
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
    return Job(run_dir, name, status, error, strategy, seed, [str(o) for o in overrides], metrics)


def read_jobs(paths: list[Path]) -> list[Job]:
    jobs = []
    for root in paths:
        for run_dir in find_run_dirs(root):
            job = read_job(run_dir, root)
            if len(paths) > 1:
                job.name = f"{root.name}/{job.name}" if run_dir != root else root.name
            jobs.append(job)
    return jobs


# ------------------------------------------------------------------------------------------ the table itself
