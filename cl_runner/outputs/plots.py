"""PNG figures of a run (score-matrix heatmap, learning curves) and of a sweep (a metric against a swept value).
matplotlib is imported inside the functions, with its headless Agg canvas, so importing this module is free and
a broken plotting stack can only cost a run its pictures, never its results."""

from __future__ import annotations

import io
import logging
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cl_runner.scoring.metrics import find

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 150
# A point of a sweep series: (swept value as typed, mean, std or None, number of runs)
Point = tuple[str, float, "float | None", int]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG whole (temporary name, then rename), like every other result file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def _title(fig: Figure, lines: list[str | None]) -> None:
    """A figure title above everything, each line wrapped to the figure's width so that none is cut."""
    width = int(fig.get_figwidth() * 11)  # characters of 10-point text per line
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in lines if line), fontsize=10)


def stage_label(stage: int, task_names: Sequence[str]) -> str:
    return "init" if stage == 0 else f"after {task_names[stage - 1]}"


# How a task metric is drawn comes from its registered object (cl_runner/scoring/metrics.py): its label, its
# direction, and whether it is bounded (0..1) or a positive number drawn on a log scale (perplexity). A name that
# is not registered (an older run's) is drawn as a 0..1 score, higher is better.
def _higher(metric: str) -> bool:
    spec = find(metric)
    return spec is None or spec.higher_is_better


def _bounded(metric: str) -> bool:
    spec = find(metric)
    return spec is None or spec.bounded


def _metric_label(metric: str) -> str:
    spec = find(metric)
    return spec.label if spec is not None else metric.replace("_", " ")


def axis_label(metric: str) -> str:
    """A learning-curve panel's y label: the metric's label, and its direction when lower is better."""
    return _metric_label(metric) + ("" if _higher(metric) else " (lower is better)")


def cell_colours(values: np.ndarray, metric_names: Sequence[str]) -> np.ndarray:
    """The heatmap's colour of each cell in 0..1, brighter (higher) = better: a bounded metric's score itself
    (1 - score when lower is better), an unbounded one's log score, scaled over its column."""
    import numpy as np

    colour = np.clip(values, 0.0, 1.0)
    for j, metric in enumerate(metric_names):
        if _bounded(metric):
            if not _higher(metric):
                colour[:, j] = 1.0 - colour[:, j]
            continue
        logs = np.log(np.maximum(values[:, j], 1e-12))
        span = float(logs.max() - logs.min()) or 1.0
        colour[:, j] = ((logs - logs.min()) if _higher(metric) else (logs.max() - logs)) / span
    return colour


def score_matrix(path: Path, task_names: Sequence[str], rows: Sequence[Sequence[float]],
                 metric_names: Sequence[str], title: str = "") -> Path:
    """Annotated heatmap of R[stage][task] (stage 0 = init); the task just trained is outlined. Scores in 0..1
    are coloured on that fixed scale; an unbounded metric's column (perplexity) on its own log scale; brighter is
    better."""
    import numpy as np

    values = np.array(rows, dtype=float)
    n_stages, n_tasks = values.shape
    colour = cell_colours(values, metric_names)
    unbounded = [m for m in dict.fromkeys(metric_names) if not _bounded(m)]
    fig = _figure(max(4.8, 1.9 + 1.15 * n_tasks), max(3.2, 1.4 + 0.5 * n_stages))
    ax = fig.add_subplot()
    image = ax.imshow(colour, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(n_stages):
        for j in range(n_tasks):
            text_colour = "black" if colour[i, j] > 0.6 else "white"
            weight = "bold" if i - 1 == j else "normal"
            ax.text(j, i, f"{values[i, j]:.2f}" if _bounded(metric_names[j]) else f"{values[i, j]:.3g}",
                    ha="center", va="center", color=text_colour, fontsize=9, fontweight=weight)
    for j in range(min(n_tasks, n_stages - 1)):  # outline the cell of the task trained at that stage
        ax.add_patch(_rectangle((j - 0.5, j + 0.5)))
    ax.set_xticks(range(n_tasks), [f"{name}\n({_metric_label(m)})" for name, m in zip(task_names, metric_names,
                                                                                     strict=True)])
    ax.set_yticks(range(n_stages), [stage_label(i, task_names) for i in range(n_stages)])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("stage of the sequence")
    ax.tick_params(length=0)
    if unbounded:
        note = f"colour: scores 0..1; {', '.join(map(_metric_label, unbounded))} per column; brighter = better"
    elif not all(map(_higher, metric_names)):  # a colour bar of raw scores would read backwards there
        note = "colour: scores 0..1, brighter = better"
    else:
        note = None
        fig.colorbar(image, ax=ax, label="score", fraction=0.05, pad=0.02)
    _title(fig, [title or "Score matrix", "outlined in red: the task just trained", note])
    return _save(fig, path)


def _rectangle(xy: tuple[float, float]):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, 1.0, 1.0, fill=False, edgecolor="#e8112d", linewidth=2.2)


def learning_curves(path: Path, task_names: Sequence[str], rows: Sequence[Sequence[float]],
                    metric_names: Sequence[str], title: str = "") -> Path:
    """Each task's score across the stages, one line per task (one panel per metric kind); a star marks the
    stage at which the task was trained."""
    from matplotlib.ticker import FuncFormatter

    metrics = list(dict.fromkeys(metric_names))
    n_stages = len(rows)
    fig = _figure(max(5.5, 1.6 + 1.1 * n_stages), 3.6 * len(metrics))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(len(metrics), 1, k + 1)
        for j, (name, task_metric) in enumerate(zip(task_names, metric_names, strict=True)):
            if task_metric != metric:
                continue
            scores = [row[j] for row in rows]
            (line,) = ax.plot(range(n_stages), scores, marker="o", markersize=4, linewidth=1.8, label=name)
            if j + 1 < n_stages:
                ax.plot([j + 1], [scores[j + 1]], marker="*", markersize=13, color=line.get_color(),
                        markeredgecolor="black", markeredgewidth=0.6, linestyle="none")
        ax.set_xticks(range(n_stages), [stage_label(i, task_names) for i in range(n_stages)])
        ax.set_xlabel("stage of the sequence")
        ax.set_ylabel(axis_label(metric))
        if not _bounded(metric):
            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(title="task", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _title(fig, [title or "Learning curves", "★ the stage at which the task was trained"])
    return _save(fig, path)


def plot_run(run_dir: Path, task_names: Sequence[str], rows: Sequence[Sequence[float]],
             metric_names: Sequence[str], title: str = "") -> list[Path]:
    """``score_matrix.png`` and ``learning_curves.png`` in ``run_dir``. Never raises: a run keeps its results
    even when its pictures cannot be drawn (a warning says why)."""
    try:
        return [score_matrix(Path(run_dir) / "score_matrix.png", task_names, rows, metric_names, title),
                learning_curves(Path(run_dir) / "learning_curves.png", task_names, rows, metric_names, title)]
    except Exception as exc:  # plotting must not fail a finished run
        log.warning("plots of %s were not written: %s: %s", run_dir, type(exc).__name__, exc)
        return []


def _as_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def metric_vs_parameter(path: Path, parameter: str, metric_label: str, series: dict[str, list[Point]],
                        title: str = "") -> Path:
    """``metric_label`` against the values of ``parameter``: one line per series (a strategy, and the other
    swept values when they differ), error bars = std over seeds. Numeric values share one x axis (logarithmic
    when they span a decade or more); other values (names) become grouped bars."""
    values = [v for points in series.values() for v, *_ in points]
    numeric = all(_as_number(v) is not None for v in values)
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    if numeric:
        for label, points in series.items():
            points = sorted(points, key=lambda p: float(p[0]))
            ax.errorbar([float(p[0]) for p in points], [p[1] for p in points],
                        yerr=[p[2] or 0.0 for p in points], marker="o", capsize=4, linewidth=1.8, label=label)
        positive = [float(v) for v in values if float(v) > 0]
        if len(positive) == len(values) and max(positive) / min(positive) >= 10:  # lambdas, buffer sizes
            ax.set_xscale("log")
    else:
        categories = list(dict.fromkeys(values))
        width = 0.8 / max(1, len(series))
        for k, (label, points) in enumerate(series.items()):
            by_value = {p[0]: p for p in points}
            xs = [i + (k - (len(series) - 1) / 2) * width for i, c in enumerate(categories) if c in by_value]
            present = [by_value[c] for c in categories if c in by_value]
            ax.bar(xs, [p[1] for p in present], width=width * 0.95, yerr=[p[2] or 0.0 for p in present],
                   capsize=4, label=label)
        if len(series) == 1:  # one bar per value: say how many runs each bar averages
            runs = {p[0]: p[3] for p in next(iter(series.values()))}
            ax.set_xticks(range(len(categories)), [f"{c}\n(n={runs[c]})" for c in categories])
        else:
            ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(parameter)
    ax.set_ylabel(metric_label)
    ax.grid(alpha=0.3)
    if len(series) > 1 or next(iter(series), "") != "":
        fig.legend(fontsize=8, loc="outside lower center", ncols=min(2, len(series)))
    _title(fig, [title or f"{metric_label} against {parameter}"])
    return _save(fig, path)
