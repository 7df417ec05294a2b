"""The files a run writes and the console table. Every file is replaced whole (temporary name, fsync, rename),
so an interrupted run never leaves a half-written result; each matrix row and history line is on disk as soon
as it exists."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def stage_names(task_names: list[str]) -> list[str]:
    return ["init"] + [f"after_{name}" for name in task_names]


class RunWriter:
    """Writes ``accuracy_matrix.csv``, ``history.jsonl``, ``metrics.json`` and ``config.yaml`` into ``run_dir``."""

    def __init__(self, run_dir: Path, task_names: list[str]) -> None:
        self.run_dir = Path(run_dir)
        self.task_names = task_names
        self.rows: list[list[float]] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def write_config(self, yaml_text: str) -> None:
        write_atomic(self.run_dir / "config.yaml", yaml_text)

    def add_row(self, scores: list[float]) -> None:
        """Append one stage (init, then after each task) and rewrite the matrix CSV."""
        self.set_rows([*self.rows, scores])

    def set_rows(self, rows: list[list[float]]) -> None:
        """Replace all stages (on resume) and rewrite the matrix CSV."""
        self.rows = list(rows)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["stage", *self.task_names])
        for stage, row in zip(stage_names(self.task_names), self.rows, strict=False):
            writer.writerow([stage, *(repr(float(v)) for v in row)])  # exact: metrics recompute to the bit
        write_atomic(self.run_dir / "accuracy_matrix.csv", buffer.getvalue())

    def add_history(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "history.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_atomic(self.run_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(console: Console, task_names: list[str], rows: list[list[float]], metrics: dict[str, Any],
                  metric_names: list[str], run_dir: Path) -> None:
    """The score matrix (stages x tasks), the summary metrics and where the files are."""
    matrix = Table(title="Score matrix R\\[stage]\\[task] (bold: the task just trained)", title_justify="left")
    matrix.add_column("stage", style="bold")
    for name, metric in zip(task_names, metric_names, strict=True):
        matrix.add_column(f"{name}\n({metric})", justify="right")
    for i, (stage, row) in enumerate(zip(stage_names(task_names), rows, strict=False)):
        cells = [f"[bold]{_fmt(v)}[/bold]" if i - 1 == j else _fmt(v) for j, v in enumerate(row)]
        matrix.add_row(stage, *cells)
    console.print(matrix)
    summary = Table(title="Summary", title_justify="left", show_header=False)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for key, label in [
        ("average_accuracy", "average accuracy (final row)"),
        ("average_forgetting", "average forgetting"),
        ("backward_transfer", "backward transfer (BWT)"),
        ("forward_transfer", "forward transfer (FWT)"),
        ("average_learning_curve_area", "learning-curve area"),
    ]:
        summary.add_row(label, _fmt(metrics.get(key)))
    summary.add_row("wall time (s)", _fmt(metrics.get("wall_time_s"), 1))
    for key, value in (metrics.get("strategy_accounting") or {}).items():
        summary.add_row(key.replace("_", " "), str(value))
    console.print(summary)
    console.print(f"results: [bold]{run_dir}[/bold]")
