"""``cl-report PATH...``: one table from runs and sweeps. One row per configuration (the overrides a job ran
with, less ``seed=``), mean ± std over its seeds, best first; printed with rich and written as CSV, Markdown
and PNG plots. A job that did not complete is listed with its status and error, never left out."""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import cl_runner.scoring.metrics as task_metrics
from cl_runner.core.console import print_whole
from cl_runner.core.files import write_atomic
from cl_runner.outputs import plots
from cl_runner.outputs.cost import COST_FIELDS, format_value
from cl_runner.outputs.jobs import Job, check_paths, override_key, read_jobs

# A run's summary metrics (not the task metrics of cl_runner/scoring/metrics.py, which fill the score matrix):
# metrics.json key -> (label, higher is better). The first five are the table's columns; all are sortable.
RUN_METRICS: dict[str, tuple[str, bool]] = {
    "average_accuracy": ("ACC", True),
    "average_forgetting": ("forgetting", False),
    "backward_transfer": ("BWT", True),
    "forward_transfer": ("FWT", True),
    "wall_time_s": ("time (s)", False),
    "average_learning_curve_area": ("LCA", True),
}
SHOWN = list(RUN_METRICS)[:5]
LONG_NAMES = {"average_accuracy": "average accuracy", "average_forgetting": "average forgetting",
              "backward_transfer": "backward transfer", "forward_transfer": "forward transfer",
              "wall_time_s": "wall time (s)", "average_learning_curve_area": "learning-curve area"}
ALIASES = {"acc": "average_accuracy", "forgetting": "average_forgetting", "bwt": "backward_transfer",
           "fwt": "forward_transfer", "wall_time": "wall_time_s", "time": "wall_time_s",
           "lca": "average_learning_curve_area"}
# metrics.json's cost block (cl_runner/outputs/cost.py): every number sortable (lower is better) and in the CSVs; these
# printed in the table when a run has them
COST_COLUMNS = {"cost.trainable_parameters": "trainable", "cost.extra_parameters": "extra params",
                "cost.peak_cpu_rss_bytes": "peak RSS", "cost.peak_cuda_allocated_bytes": "peak CUDA",
                "cost.train_seconds": "train (s)", "cost.eval_seconds": "eval (s)", "cost.tokens_seen": "tokens"}
RUN_METRICS.update({f"cost.{key}": (COST_COLUMNS.get(f"cost.{key}", key), False) for key in COST_FIELDS})
LONG_NAMES.update({f"cost.{key}": label for key, (label, _) in COST_FIELDS.items()})


@dataclass
class Configuration:
    """The jobs that ran one setting (same strategy and the same values for every key any job typed), e.g. with
    different seeds."""

    strategy: str
    settings: dict[str, str]  # override key -> the value it ran with (Job.setting: typed or not)
    jobs: list[Job]

    @property
    def completed(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "completed"]

    def stat(self, metric: str) -> tuple[float | None, float | None, int]:
        """(mean, sample standard deviation (n - 1; None for one run), n) over the completed runs."""
        values = [v for j in self.completed if (v := j.value(metric)) is not None]
        if not values:
            return None, None, 0
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)

    def status(self) -> str:
        counts = {s: sum(j.status == s for j in self.jobs) for s in dict.fromkeys(j.status for j in self.jobs)}
        if list(counts) == ["completed"]:
            return "completed"
        if len(counts) == 1:
            return next(iter(counts))
        return ", ".join(f"{n} {s}" for s, n in counts.items())

    def seeds(self) -> str:
        return ",".join(str(s) for s in sorted({j.seed for j in self.jobs if j.seed is not None}))


def group_jobs(jobs: list[Job]) -> list[Configuration]:
    """Jobs with the same strategy and the same values (seed aside) form one configuration, first-seen order. The
    values are those of every key any job typed, as each job ran it: typed, or from a default or an experiment
    file (``train.lr=0.003`` typed and the default 0.003 are one setting)."""
    keys = list(dict.fromkeys(k for j in jobs for k in map(override_key, j.configuration) if k != "strategy"))
    groups: dict[tuple, Configuration] = {}
    for job in jobs:
        settings = {k: job.setting(k) for k in keys}
        group = (job.strategy, tuple(settings.items()))
        groups.setdefault(group, Configuration(job.strategy, settings, [])).jobs.append(job)
    return list(groups.values())


def swept_keys(configs: list[Configuration]) -> list[str]:
    """Keys whose value differs between configurations (strategy has its own column); with a single
    configuration, all the keys its jobs typed, so that the row says what was run."""
    keys = list(dict.fromkeys(k for c in configs for k in c.settings))
    if len(configs) == 1:
        return keys
    return [k for k in keys if len({c.settings.get(k) for c in configs}) > 1]


def resolve_metric(name: str) -> str:
    metric = ALIASES.get(name.lower(), name)
    if metric not in RUN_METRICS:
        raise ValueError(f"--sort: unknown metric {name!r}; expected one of {', '.join([*RUN_METRICS, *ALIASES])}")
    return metric


def higher_is_better(metric: str, jobs: list[Job]) -> bool:
    """The metric's direction; the average score reads lower-is-better when every task is scored by perplexity."""
    if metric in ("average_accuracy", "average_learning_curve_area"):
        kinds = {m for j in jobs for m in j.metrics.get("metric_per_task") or []}
        if kinds and not any(map(task_metrics.higher_is_better, kinds)):
            return False
    return RUN_METRICS[metric][1]


def rank(configs: list[Configuration], metric: str, higher: bool) -> list[Configuration]:
    """Best first by the mean of ``metric``; configurations without a value (all failed) last."""
    def key(config: Configuration) -> tuple:
        mean = config.stat(metric)[0]
        return (mean is None, 0.0 if mean is None else (-mean if higher else mean))

    return sorted(configs, key=key)


def summary_rows(configs: list[Configuration], keys: list[str], metric: str) -> list[dict[str, Any]]:
    """One CSV-ready dict per configuration (in the given order): swept values, run counts, mean and std of
    every metric, the difference to the first row in ``metric``, and the errors of jobs that did not complete."""
    best = configs[0].stat(metric)[0] if configs else None
    rows = []
    for i, config in enumerate(configs, 1):
        row: dict[str, Any] = {"rank": i, "strategy": config.strategy}
        row.update({k: config.settings.get(k, "") for k in keys})
        row.update({"seeds": config.seeds(), "runs": len(config.jobs), "completed": len(config.completed),
                    "status": config.status()})
        for name in RUN_METRICS:
            mean, std, _ = config.stat(name)
            row[f"{name}_mean"], row[f"{name}_std"] = mean, std
        mean = config.stat(metric)[0]
        row[f"delta_{metric}"] = None if mean is None or best is None else mean - best
        row["errors"] = "; ".join(f"{j.name}: {j.error}" for j in config.jobs if j.status != "completed"
                                  and j.error)
        rows.append(row)
    return rows


def job_rows(jobs: list[Job]) -> list[dict[str, Any]]:
    """One CSV-ready dict per job (jobs.csv): the raw material of the summary."""
    return [{"job": j.name, "status": j.status, "error": j.error or "", "strategy": j.strategy, "seed": j.seed,
             "overrides": " ".join(j.configuration), **{name: j.value(name) for name in RUN_METRICS}} for j in jobs]


def mean_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def cell(name: str, mean: float | None, std: float | None) -> str:
    """A metric's cell: mean ± std; cost counts and bytes as their mean, compactly (529.3k, 1.2 GB)."""
    key = name.removeprefix("cost.")
    if key in COST_FIELDS and COST_FIELDS[key][1] != "seconds":
        return format_value(key, mean)
    return mean_std(mean, std, 1 if name == "wall_time_s" or key in COST_FIELDS else 3)


def delta_cell(name: str, delta: float | None) -> str:
    key = name.removeprefix("cost.")
    if delta is None:
        return "-"
    if key in COST_FIELDS and COST_FIELDS[key][1] != "seconds":
        return ("+" if delta >= 0 else "-") + format_value(key, abs(delta))
    return f"{delta:+.{1 if name == 'wall_time_s' or key in COST_FIELDS else 3}f}"


def formatted(rows: list[dict[str, Any]], keys: list[str], metric: str) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the printed table (console and Markdown): metrics as mean ± std, then the cost
    columns that any row has a value for."""
    headers = ["#", "strategy", *keys, "seeds", "runs"]
    shown = [*SHOWN, *(name for name in COST_COLUMNS if any(row[f"{name}_mean"] is not None for row in rows))]
    for name in shown:
        headers.append(RUN_METRICS[name][0])
        if name == metric:
            headers.append("Δ best")
    if metric not in shown:
        headers += [RUN_METRICS[metric][0], "Δ best"]
    headers.append("status")
    cells = []
    for row in rows:
        line = [str(row["rank"]), row["strategy"], *(str(row[k]) for k in keys), row["seeds"] or "-",
                str(row["completed"]) if row["completed"] == row["runs"] else f"{row['completed']} of {row['runs']}"]
        for name in shown if metric in shown else [*shown, metric]:
            line.append(cell(name, row[f"{name}_mean"], row[f"{name}_std"]))
            if name == metric:
                line.append(delta_cell(name, row[f"delta_{metric}"]))
        line.append(row["status"])
        cells.append(line)
    return headers, cells


def options_in_strategy(headers: list[str], cells: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """A strategy option that some rows leave blank (it belongs to some strategies only) as ``option=value`` in
    the strategy's cell instead of a column of its own; an option every row sets (a sweep over it) stays one."""
    where = headers.index("strategy")
    moved = [k for k, h in enumerate(headers) if h.startswith("strategy.") and any(not line[k] for line in cells)]
    cells = [[" ".join([line[where], *(f"{headers[k].removeprefix('strategy.')}={line[k]}" for k in moved
                                       if line[k])]) if i == where else c for i, c in enumerate(line)]
             for line in cells]
    keep = [k for k in range(len(headers)) if k not in moved]
    return [headers[k] for k in keep], [[line[k] for k in keep] for line in cells]


def differing(headers: list[str], cells: list[list[str]], metric: str) -> tuple[list[str], list[list[str]],
                                                                                list[tuple[str, str]]]:
    """The console's columns: those whose cells differ between rows (the rank, the sort metric and its Δ always),
    and (header, value) of the columns left out because every row has the same value. One row keeps them all."""
    if len(cells) < 2:
        return headers, cells, []
    always = {"#", RUN_METRICS[metric][0], "Δ best"}
    keep = [k for k, h in enumerate(headers) if h in always or len({line[k] for line in cells}) > 1]
    same = [(h, cells[0][k]) for k, h in enumerate(headers) if k not in keep]
    return [headers[k] for k in keep], [[line[k] for k in keep] for line in cells], same


# ------------------------------------------------------------------------------------------------ a report
@dataclass
class Report:
    sources: list[Path]
    jobs: list[Job]
    configs: list[Configuration]  # ranked, best first
    keys: list[str]  # swept override keys
    metric: str
    higher: bool

    @property
    def rows(self) -> list[dict[str, Any]]:
        return summary_rows(self.configs, self.keys, self.metric)

    @property
    def unfinished(self) -> list[Job]:
        return [j for j in self.jobs if j.status != "completed"]

    def direction(self) -> str:
        return f"{RUN_METRICS[self.metric][0]}, {'higher' if self.higher else 'lower'} is better"


def build_report(paths: list[Path], metric: str = "average_accuracy") -> Report:
    """Read every run under ``paths`` and rank its configurations by ``metric``; raises ValueError (naming the
    path) when a path is missing or holds no run."""
    metric = resolve_metric(metric)
    paths = [Path(p) for p in paths]
    check_paths(paths)
    jobs = read_jobs(paths)
    higher = higher_is_better(metric, jobs)
    configs = rank(group_jobs(jobs), metric, higher)
    return Report(paths, jobs, configs, swept_keys(configs), metric, higher)


def _unfinished_note(job: Job) -> str:
    if job.status == "interrupted":
        return f"interrupted; resume with: cl-run resume={job.path}"
    if job.status == "running":
        return job.error or "still running, or killed without a word (metrics.json says running)"
    return job.error or "no error recorded"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def print_report(report: Report, console: Console) -> None:
    """The table with the columns that differ between rows (report.csv and report.md hold them all), the values
    every row shares on one line below it, then the jobs that did not complete."""
    rows = report.rows
    headers, cells = options_in_strategy(*formatted(rows, report.keys, report.metric))
    headers, cells, same = differing(headers, cells, report.metric)
    failed = sum(j.status == "failed" for j in report.jobs)
    table = Table(title=f"{_count(len(report.configs), 'configuration')}, {_count(len(report.jobs), 'job')}"
                        f"{f' ({failed} failed)' if failed else ''} · sorted by {report.direction()} · "
                        "mean ± std over seeds", title_justify="left")
    for k, header in enumerate(headers):
        text = header in ("strategy", "status", *report.keys)
        widest = max(len(line[k]) for line in cells) if cells else 1
        # numbers are never folded (and their headers wrap at spaces to fit them); names fold, but keep a readable
        # width when the terminal is narrow
        table.add_column(escape(header), justify="left" if text else "right", overflow="fold",
                         min_width=min(widest, 14) if text else widest)
    for line, row in zip(cells, rows, strict=True):
        style = "" if row["status"] == "completed" else "red" if "failed" in row["status"] else "yellow"
        table.add_row(*(f"[{style}]{escape(c)}[/{style}]" if style and h == "status" else escape(c)
                        for h, c in zip(headers, line, strict=True)))
    print_whole(console, table)  # to a file or pipe whole; in a terminal names fold, numbers never
    if same:
        console.print("same in every row: " + " · ".join(f"{escape(h)} {escape(v)}" for h, v in same),
                      soft_wrap=True)
    for job in report.unfinished:
        console.print(f"[red]{job.status}[/red] {escape(job.name)}: {escape(_unfinished_note(job))}", soft_wrap=True)


def markdown(report: Report) -> str:
    headers, cells = formatted(report.rows, report.keys, report.metric)

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    out = ["# cl-report", "",
           f"Sorted by {report.direction()}, best first. Metrics are mean ± std over a configuration's seeds "
           "(sample std, n − 1) where it ran with several; `runs` counts the completed runs averaged. "
           f"Δ best: difference to the first row. Sources: {', '.join(f'`{p}`' for p in report.sources)}.", "",
           line(headers), line(["---"] * len(headers)), *(line(c) for c in cells), ""]
    if report.unfinished:
        out += ["## Jobs that did not complete", ""]
        out += [f"- `{j.name}`: **{j.status}**: {_unfinished_note(j)}" for j in report.unfinished]
        out.append("")
    return "\n".join(out)


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def sweep_series(report: Report, parameter: str) -> dict[str, list[plots.Point]]:
    """The points of ``metric`` against ``parameter``: one series per strategy, split further by the other
    swept values when those differ within the strategy."""
    with_value = [c for c in report.configs if parameter in c.settings and c.stat(report.metric)[0] is not None]
    others = [k for k in report.keys if k != parameter]
    series: dict[str, list[plots.Point]] = {}
    for config in with_value:
        same_strategy = [c for c in with_value if c.strategy == config.strategy]
        varying = [k for k in others if len({c.settings.get(k) for c in same_strategy}) > 1]
        label = ", ".join([config.strategy, *(f"{k}={compact(config.settings.get(k, '-'))}" for k in varying)])
        mean, std, n = config.stat(report.metric)
        series.setdefault(label, []).append((config.settings[parameter], mean, std, n))
    return series


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """For a sweep: the metric against each swept value (or per strategy when only the strategy varies). For
    the best configuration: its score matrix and learning curves, averaged over its seeds."""
    written: list[Path] = []
    long, short = LONG_NAMES[report.metric], RUN_METRICS[report.metric][0]
    label = (long if short in long else f"{long} ({short})") + ("" if report.higher else ", lower is better")
    if len(report.configs) > 1:
        for parameter in report.keys:
            series = sweep_series(report, parameter)
            if sum(len(points) for points in series.values()) > 1:
                written.append(plots.metric_vs_parameter(
                    out_dir / f"{report.metric}_vs_{_safe(parameter)}.png", parameter, label, series,
                    f"{label} against {parameter} (mean ± std over seeds)"))
        strategies = [c for c in report.configs if c.stat(report.metric)[0] is not None]
        if not report.keys and len({c.strategy for c in strategies}) > 1:
            points = [(c.strategy, *c.stat(report.metric)) for c in strategies]
            written.append(plots.metric_vs_parameter(
                out_dir / f"{report.metric}_by_strategy.png", "strategy", label, {"": points},
                f"{label} by strategy (mean ± std over seeds)"))
    best = next((c for c in report.configs if c.completed and c.completed[0].score_rows()), None)
    if best is not None:
        runs = [j for j in best.completed if j.score_rows() is not None
                and j.metrics["tasks"] == best.completed[0].metrics["tasks"]]
        tasks = runs[0].metrics["tasks"]
        kinds = runs[0].metrics.get("metric_per_task") or ["score"] * len(tasks)
        matrices = [j.score_rows() for j in runs]
        mean_rows = [[_mean_or_none([m[i][j] for m in matrices]) for j in range(len(tasks))]
                     for i in range(len(matrices[0]))]
        setting = " ".join([best.strategy, *(f"{k}={compact(best.settings[k])}" for k in report.keys
                                             if k in best.settings)])
        title = f"best by {RUN_METRICS[report.metric][0]}: {setting} ({_runs(len(runs))})"
        written.append(plots.score_matrix(out_dir / "best_score_matrix.png", tasks, mean_rows, kinds, title))
        written.append(plots.learning_curves(out_dir / "best_learning_curves.png", tasks, mean_rows, kinds, title))
    return written


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean of a matrix cell over seeds; None where no run scored it (``eval.full_every`` skips cells)."""
    scored = [v for v in values if v is not None]
    return statistics.fmean(scored) if scored else None


def compact(value: str) -> str:
    """A swept value for a title or legend: long floats (Optuna's samples) to 4 significant digits."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if len(value) <= 8 or not math.isfinite(number) else f"{number:.4g}"


def _runs(n: int) -> str:
    return "1 run" if n == 1 else f"mean of {n} runs"


def write_report(report: Report, out_dir: Path, with_plots: bool = True) -> list[Path]:
    """``report.csv`` (one row per configuration), ``report.md``, ``jobs.csv`` (one row per job) and the plots."""
    out_dir = Path(out_dir)
    files = {"report.csv": _csv(report.rows), "report.md": markdown(report), "jobs.csv": _csv(job_rows(report.jobs))}
    for name, text in files.items():
        write_atomic(out_dir / name, text)
    written = [out_dir / name for name in files]
    return written + (write_plots(report, out_dir) if with_plots else [])
