"""The files a run writes and the console table. Every file is replaced whole (temporary name, fsync, rename),
so an interrupted run never leaves a half-written result; each matrix row and history line is on disk as soon
as it exists."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cl_runner.core.console import print_whole
from cl_runner.core.errors import DiskFullError
from cl_runner.core.files import disk_full_error, human_bytes, is_disk_full, write_atomic
from cl_runner.outputs.cost import COST_FIELDS, compact, cost_rows

log = logging.getLogger(__name__)
RESULT_FILES = ("accuracy_matrix.csv", "metrics.json", "history.jsonl", "score_matrix.png", "learning_curves.png",
                "predictions")  # predictions/: a folder (eval.save_predictions)


def stage_names(task_names: list[str]) -> list[str]:
    return ["init"] + [f"after_{name}" for name in task_names]


class RunWriter:
    """Writes ``accuracy_matrix.csv``, ``history.jsonl``, ``metrics.json`` and ``config.yaml`` into ``run_dir``."""

    def __init__(self, run_dir: Path, task_names: list[str], monitor_names: list[str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.task_names = task_names
        self.monitor_names = monitor_names or []  # extra columns after the tasks: monitor:<name> (never trained)
        self.rows: list[list[float | None]] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def add_row(self, scores: list[float]) -> None:
        """Append one stage (init, then after each task) and rewrite the matrix CSV."""
        self.set_rows([*self.rows, scores])

    def set_rows(self, rows: list[list[float]]) -> None:
        """Replace all stages (on resume) and rewrite the matrix CSV."""
        self.rows = list(rows)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["stage", *self.task_names, *(f"monitor:{name}" for name in self.monitor_names)])
        for stage, row in zip(stage_names(self.task_names), self.rows, strict=False):
            # exact: metrics recompute to the bit; empty: a cell the stage schedule (eval.full_every) skipped
            writer.writerow([stage, *("" if v is None else repr(float(v)) for v in row)])
        write_atomic(self.run_dir / "accuracy_matrix.csv", buffer.getvalue())

    def add_history(self, record: dict[str, Any]) -> None:
        """Append one epoch line (a line cut short by a full disk is replaced on resume, see ``set_history``)."""
        line, path = json.dumps(record) + "\n", self.run_dir / "history.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(path, len(line.encode())) from exc
            raise

    def set_history(self, records: list[dict[str, Any]]) -> None:
        """Replace history.jsonl with ``records`` (on resume: the checkpoint's, so no epoch is doubled or lost)."""
        write_atomic(self.run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Rewrite metrics.json. Recording a failure or an interruption on a full disk only warns: the error
        being recorded is the one to report."""
        try:
            write_atomic(self.run_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
        except DiskFullError as exc:
            if metrics.get("status") not in ("failed", "interrupted"):
                raise
            log.warning("could not record status %r: %s", metrics["status"], exc)

    def supersede(self) -> Path | None:
        """Move the results written so far into ``superseded/<n>/`` (a run restarting from the beginning keeps
        them there); returns that folder, or None when there was nothing to move."""
        found = [self.run_dir / name for name in RESULT_FILES if (self.run_dir / name).exists()]
        if not found:
            return None
        number = 1
        while (self.run_dir / "superseded" / str(number)).exists():
            number += 1
        target = self.run_dir / "superseded" / str(number)
        target.mkdir(parents=True)
        for path in found:
            os.replace(path, target / path.name)
        self.rows = []
        return target


class RankWriter(RunWriter):
    """The writer of ranks other than 0: it keeps the rows like rank 0's and writes nothing (rank 0 writes)."""

    def __init__(self, run_dir: Path, task_names: list[str]) -> None:
        self.run_dir, self.task_names, self.rows = Path(run_dir), task_names, []

    def set_rows(self, rows: list[list[float]]) -> None:
        self.rows = list(rows)

    def add_history(self, record: dict[str, Any]) -> None:
        pass

    def set_history(self, records: list[dict[str, Any]]) -> None:
        pass

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def supersede(self) -> Path | None:
        return None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def accounting_rows(accounting: dict[str, Any], cost: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of a strategy's accounting for the summary table, in human units only: a count the cost
    rows already show (trainable and extra parameters) is left out, bytes read in kB/MB/GB, counts compact (134.5M);
    metrics.json keeps every raw number."""
    rows = []
    for key, value in accounting.items():
        if key in COST_FIELDS and cost.get(key) == value:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            text = str(value)
        elif "bytes" in key:
            text = human_bytes(value)
        else:
            text = compact(value) if isinstance(value, int) else f"{value:.3g}"
        rows.append((key.replace("_", " "), text))
    return rows


def print_summary(console: Console, task_names: list[str], rows: list[list[float]], metrics: dict[str, Any],
                  metric_names: list[str], run_dir: Path) -> None:
    """The score matrix (stages x tasks), the summary metrics and where the files are."""
    matrix = Table(title="Score matrix R\\[stage]\\[task] (bold: the task just trained)", title_justify="left")
    matrix.add_column("stage", style="bold", overflow="fold")
    for name, metric in zip(task_names, metric_names, strict=True):
        matrix.add_column(f"{escape(name)}\n({metric})", justify="right", overflow="fold", min_width=5)
    for i, (stage, row) in enumerate(zip(stage_names(task_names), rows, strict=False)):
        cells = [f"[bold]{_fmt(v)}[/bold]" if i - 1 == j else _fmt(v) for j, v in enumerate(row)]
        matrix.add_row(escape(stage), *cells)
    print_whole(console, matrix)
    summary = Table(title="Summary", title_justify="left", show_header=False)
    summary.add_column("metric", overflow="fold")
    summary.add_column("value", justify="right", overflow="fold")
    for key, label in [
        ("average_accuracy", "average accuracy (final row)"),
        ("average_forgetting", "average forgetting"),
        ("backward_transfer", "backward transfer (BWT)"),
        ("forward_transfer", "forward transfer (FWT)"),
        ("average_learning_curve_area", "learning-curve area"),
    ]:
        summary.add_row(label, _fmt(metrics.get(key)))
    summary.add_row("wall time (s)", _fmt(metrics.get("wall_time_s"), 1))
    for label, value in cost_rows(metrics.get("cost") or {}):  # parameters, peak memory, seconds, tokens
        summary.add_row(label, value)
    for label, value in accounting_rows(metrics.get("strategy_accounting") or {}, metrics.get("cost") or {}):
        summary.add_row(escape(label), escape(value))
    saved = metrics.get("saved_model")
    if saved:  # save.final_model: the directory and its size (one model copy), or why nothing was saved
        summary.add_row("saved model", escape(f"{saved['path']}/ ({human_bytes(saved['bytes'])})" if saved["path"]
                                              else f"none: {saved['refused']}"))
    print_whole(console, summary)
    console.print(f"results: [bold]{escape(str(run_dir))}[/bold]", soft_wrap=True)
