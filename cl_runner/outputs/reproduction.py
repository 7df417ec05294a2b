"""``cl-report --paper``: runs beside the numbers a paper reports for them.

The numbers live in the experiment files (``paper:`` in conf/experiment/<name>.yaml: its source, the metric, and
one row per method naming the cl-runner strategy and options that run it); a run carries its experiment's block
in its config too, so an experiment of one's own works the same way. A run belongs to a row when its
``experiment_name`` is the row's experiment, its strategy the row's, and its strategy options (after the
sequence's ``tasks.strategy_overrides``) equal the row's ``where``. Each row shows the paper's value, the mean ±
std over the completed runs (seeds), the difference, and plainly when nothing has run yet."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cl_runner.core.files import write_atomic
from cl_runner.outputs.jobs import Job, read_jobs

CONF_EXPERIMENTS = Path(__file__).resolve().parents[2] / "conf" / "experiment"
NOT_RUN = "not run yet (needs a GPU)"


@dataclass
class PaperRow:
    experiment: str
    source: str
    metric: str
    method: str
    strategy: str
    value: float
    where: dict[str, Any] = field(default_factory=dict)
    runs: list[Job] = field(default_factory=list)

    def matches(self, job: Job) -> bool:
        options = effective_options(job)
        return (job.metrics.get("experiment_name") == self.experiment and job.strategy == self.strategy
                and all(options.get(k) == v for k, v in self.where.items()))

    def scores(self) -> list[float]:
        """The completed runs' metric, in the paper's unit (percent for a fraction)."""
        values = [job.value(self.metric) for job in self.runs if job.status == "completed"]
        return [100 * v for v in values if v is not None]


def effective_options(job: Job) -> dict[str, Any]:
    """The run's strategy options with its sequence's ``tasks.strategy_overrides`` for that strategy applied."""
    config = job.metrics.get("config") or {}
    options = dict(config.get("strategy") or {})
    return options | ((config.get("tasks") or {}).get("strategy_overrides") or {}).get(job.strategy, {})


def rows_of(experiment: str, paper: dict[str, Any]) -> list[PaperRow]:
    """The rows of one ``paper:`` block."""
    metric, source = paper.get("metric", "average_accuracy"), paper.get("source", "?")
    return [PaperRow(experiment, source, metric, r["method"], r["strategy"], float(r["value"]), r.get("where") or {})
            for r in paper.get("rows") or []]


def experiment_rows(conf_dir: Path = CONF_EXPERIMENTS) -> list[PaperRow]:
    """Every row the experiment files state (files that set ``paper:`` themselves, in name order)."""
    rows = []
    for path in sorted(conf_dir.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if isinstance(data.get("paper"), dict):
            rows += rows_of(data.get("experiment_name", path.stem), data["paper"])
    return rows


def reproduction(paths: list[Path], conf_dir: Path = CONF_EXPERIMENTS) -> tuple[list[PaperRow], list[Job]]:
    """The paper rows with their runs, and the runs that match no row. Rows come from the experiment files and
    from the runs' own configs (an experiment defined elsewhere, or one that borrows another's numbers)."""
    rows, jobs = experiment_rows(conf_dir), read_jobs(paths) if paths else []
    known = {row.experiment for row in rows}
    for job in jobs:
        name, paper = job.metrics.get("experiment_name"), (job.metrics.get("config") or {}).get("paper")
        if name and name not in known and isinstance(paper, dict):
            rows += rows_of(name, paper)
            known.add(name)
    unmatched = []
    for job in jobs:
        matching = [row for row in rows if row.matches(job)]
        for row in matching:
            row.runs.append(job)
        if not matching:
            unmatched.append(job)
    stated = {row.experiment for row in experiment_rows(conf_dir)}  # borrowed rows only where something ran
    return [row for row in rows if row.experiment in stated or row.runs], unmatched


def _model(row: PaperRow) -> str:
    config = (row.runs[0].metrics.get("config") or {}) if row.runs else {}
    model = config.get("model") or {}
    return model.get("name_or_path") or (f"built {model['arch'].get('model_type')}" if model.get("arch") else "")


def row_cells(row: PaperRow) -> list[str]:
    """experiment, method, strategy, paper, ours, difference, runs."""
    scores = row.scores()
    method = f"{row.strategy} " + " ".join(f"{k}={yaml.safe_dump(v).splitlines()[0]}" for k, v in row.where.items())
    base = [row.experiment, row.method, method.strip(), f"{row.value:.1f}"]
    if not scores:
        states = sorted({job.status for job in row.runs})
        return base + ["", "", NOT_RUN if not row.runs else f"no completed run ({', '.join(states)})"]
    mean = statistics.fmean(scores)
    std = f" ± {statistics.stdev(scores):.1f}" if len(scores) > 1 else ""
    runs = f"{len(scores)} run{'s' * (len(scores) > 1)}, {_model(row)}"
    return base + [f"{mean:.1f}{std}", f"{mean - row.value:+.1f}", runs]


HEADER = ["experiment", "method (paper)", "cl-runner strategy", "paper", "cl-runner", "difference", "runs"]


def markdown(rows: list[PaperRow]) -> str:
    """The table in Markdown, one line per paper row; the sources below it."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in rows]
    sources = dict.fromkeys(f"- {row.experiment}: {row.source} ({row.metric}, in %)" for row in rows)
    return "\n".join(lines) + "\n\nSources:\n\n" + "\n".join(sources) + "\n"


def paper_main(paths: list[Path], out_dir: Path | None) -> str:
    """``cl-report --paper PATH...``: the table (and the runs no row claims), also written as reproduction.md into
    ``out_dir`` unless it is None."""
    rows, unmatched = reproduction(paths)
    text = markdown(rows)
    if unmatched:
        text += "\nRuns that match no paper row: " + ", ".join(
            f"{job.name} ({job.metrics.get('experiment_name', '?')}, {job.strategy})" for job in unmatched) + "\n"
    if out_dir is not None:
        write_atomic(out_dir / "reproduction.md", text)
    return text
