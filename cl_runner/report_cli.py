"""``cl-report``: the command line of the report (cl_runner/outputs/report.py), the paper comparison
(cl_runner/outputs/reproduction.py) and the flipped examples (cl_runner/outputs/predictions.py).

It writes only where it is asked to: into ``--out``, or else into the one run or sweep directory it was given;
given a folder of runs (or several paths) without ``--out`` it prints and writes nothing. Every bad argument is
one line, ``cl-report: error: ...``, exit 2, before anything is printed or written."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

from cl_runner.core.errors import DiskFullError
from cl_runner.outputs.jobs import check_paths, is_run_dir, is_sweep_dir
from cl_runner.outputs.report import ALIASES, RUN_METRICS, build_report, print_report, write_report

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block), like every other error of cl-report."""

    def error(self, message: str) -> NoReturn:
        print(f"cl-report: error: {message} (see cl-report --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cl-report",
        description="One table from cl-run runs and sweeps: a row per configuration (overrides less seed), "
                    "mean ± std over seeds, best first; written as report.csv, report.md, jobs.csv and PNG plots.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="a run, a sweep (its own jobs, as its sweep.json lists them), or a folder of them")
    p.add_argument("--sort", default="average_accuracy", metavar="METRIC",
                   help=f"rank by this metric, best first: {', '.join(RUN_METRICS)} (or {', '.join(ALIASES)}); "
                        "default average_accuracy")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the directory to write the files into (created when missing; files of the same name are "
                        "replaced). Default: the PATH when it is one run or sweep directory; otherwise the table "
                        "is printed and nothing is written")
    p.add_argument("--no-plots", action="store_true", help="write the tables only")
    p.add_argument("--flips", metavar="A:B", default=None,
                   help="one run: the examples that went from right to wrong (and wrong to right) between "
                        "stages A and B (init, after_TASK or TASK); needs the run's predictions on disk "
                        "(eval.save_predictions=every); prints them, writes nothing")
    p.add_argument("--task", default=None, help="with --flips: this task only (default: every task)")
    p.add_argument("--limit", type=int, default=10, help="with --flips: examples shown per direction (at least 1)")
    p.add_argument("--paper", action="store_true",
                   help="the runs beside the numbers their papers report (the experiment files' paper: "
                        "blocks, docs/benchmarks.md), with the rows not run yet; writes reproduction.md")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        if args.limit < 1:
            raise ValueError(f"--limit: expected a positive number of examples, got {args.limit}")
        if args.flips is not None:
            return flips_main(args.paths, args.flips, args.task, args.limit)
        check_paths(args.paths)
        out_dir = output_dir(args.paths, args.out)
        if args.paper:
            return paper_report(args.paths, out_dir)
        report = build_report(args.paths, args.sort)
    except ValueError as exc:
        _exit(str(exc))
    console = Console()
    print_report(report, console)
    if out_dir is None:
        console.print(f"not written: {_not_written(args.paths)}; add --out DIR to write report.csv, report.md, "
                      "jobs.csv and the plots", soft_wrap=True)
        return
    try:
        written = write_report(report, out_dir, with_plots=not args.no_plots)
    except (OSError, DiskFullError) as exc:
        _write_failed(exc, out_dir)
    console.print(f"written to [bold]{escape(str(out_dir))}[/bold]: {', '.join(p.name for p in written)}")


def _exit(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"cl-report: error: {message}", file=sys.stderr)
    sys.exit(code)


def _write_failed(exc: Exception, out_dir: Path | None) -> NoReturn:
    """A write that failed after the checks (a full disk: exit 5, as cl-run's; else 2)."""
    if isinstance(exc, DiskFullError):
        _exit(str(exc), exc.exit_code)
    _exit(f"cannot write into {out_dir}: {getattr(exc, 'strerror', None) or exc}")


def output_dir(paths: list[Path], out: Path | None) -> Path | None:
    """Where the files go: ``--out`` (checked: a directory, or one that can be created), else the one PATH when it
    is a run or a sweep, else nowhere (None). ValueError names what is wrong with ``--out``."""
    if out is None:
        return paths[0] if len(paths) == 1 and (is_run_dir(paths[0]) or is_sweep_dir(paths[0])) else None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; name a directory (it is created when missing)")
    existing = next(p for p in (out, *out.parents) if p.exists())  # the filesystem root exists
    if not existing.is_dir():
        raise ValueError(f"--out: cannot create {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out: cannot write to {out}: {existing} is not writable")
    return out


def _not_written(paths: list[Path]) -> str:
    if len(paths) > 1:
        return f"{len(paths)} PATHs were given"
    return f"{paths[0]} is a folder of runs, not one run or sweep"


def paper_report(paths: list[Path], out_dir: Path | None) -> None:
    """``--paper``: cl_runner/outputs/reproduction.py's table, printed, and written as reproduction.md into
    ``out_dir`` (None: printed only)."""
    from cl_runner.outputs.reproduction import paper_main

    try:
        text = paper_main(paths, out_dir)
    except (OSError, DiskFullError) as exc:
        _write_failed(exc, out_dir)
    print(text, end="")
    if out_dir is None:
        print(f"\nnot written: {_not_written(paths)}; add --out DIR to write reproduction.md")


def flips_main(paths: list[Path], spec: str, task: str | None, limit: int) -> None:
    """``--flips``: the flipped examples of one run (cl_runner/outputs/predictions.py); ValueError: a one-line error."""
    from cl_runner.outputs.predictions import print_flips

    if len(paths) != 1 or not (paths[0] / "metrics.json").is_file():
        raise ValueError(f"--flips: expected one run directory (holding metrics.json), got {' '.join(map(str, paths))}")
    print_flips(paths[0], spec, task, limit, Console())


if __name__ == "__main__":
    main()
