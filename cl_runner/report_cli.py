"""``cl-report``: the command line of the report (cl_runner/outputs/report.py), the paper comparison
(cl_runner/outputs/reproduction.py) and the flipped examples (cl_runner/outputs/predictions.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cl_runner.outputs.report import ALIASES, RUN_METRICS, build_report, print_report, write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cl-report",
        description="One table from cl-run runs and sweeps: a row per configuration (overrides less seed), "
                    "mean ± std over seeds, best first; written as report.csv, report.md, jobs.csv and PNG plots.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="a run, a sweep, or a folder of them")
    parser.add_argument("--sort", default="average_accuracy", metavar="METRIC",
                        help=f"rank by this metric, best first: {', '.join(RUN_METRICS)} (or {', '.join(ALIASES)}); "
                             "default average_accuracy")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the files (default: the PATH when one is given, else ./report)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    parser.add_argument("--flips", metavar="A:B", default=None,
                        help="one run: the examples that went from right to wrong (and wrong to right) between "
                             "stages A and B (init, after_TASK or TASK); needs the run's predictions on disk "
                             "(eval.save_predictions=every); prints them, writes nothing")
    parser.add_argument("--task", default=None, help="with --flips: this task only (default: every task)")
    parser.add_argument("--limit", type=int, default=10, help="with --flips: examples shown per direction")
    parser.add_argument("--paper", action="store_true",
                        help="the runs beside the numbers their papers report (the experiment files' paper: "
                             "blocks, docs/benchmarks.md), with the rows not run yet; writes reproduction.md")
    args = parser.parse_args(argv)
    try:
        if args.flips is not None:
            return flips_main(args.paths, args.flips, args.task, args.limit)
        if args.paper:
            return paper_report(args.paths, args.out)
        report = build_report(args.paths, args.sort)
    except ValueError as exc:
        print(f"cl-report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    out_dir = args.out or (args.paths[0] if len(args.paths) == 1 else Path("report"))
    console = Console()
    print_report(report, console)
    written = write_report(report, out_dir, with_plots=not args.no_plots)
    console.print(f"written to [bold]{escape(str(out_dir))}[/bold]: {', '.join(p.name for p in written)}")


def paper_report(paths: list[Path], out: Path | None) -> None:
    """``--paper``: cl_runner/outputs/reproduction.py's table, printed and written (to --out, else the one PATH)."""
    from cl_runner.outputs.reproduction import paper_main

    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise ValueError(f"--paper: expected run or sweep folders, got {', '.join(missing)}")
    print(paper_main(paths, out or (paths[0] if len(paths) == 1 else Path("report"))), end="")


def flips_main(paths: list[Path], spec: str, task: str | None, limit: int) -> None:
    """``--flips``: the flipped examples of one run (cl_runner/outputs/predictions.py); ValueError: a one-line error."""
    from cl_runner.outputs.predictions import print_flips

    if len(paths) != 1 or not (paths[0] / "metrics.json").is_file():
        raise ValueError(f"--flips: expected one run directory (holding metrics.json), got {' '.join(map(str, paths))}")
    print_flips(paths[0], spec, task, limit, Console())


if __name__ == "__main__":
    main()
