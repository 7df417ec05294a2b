"""Benchmark cl-run's start-up cost: how fast ``--help`` and a bad-input error answer, and the fixed cost of the
default run (process start to its first optimizer step, and its last step to process exit).

Every case runs in a fresh Python process. The rounds are interleaved (help, bad input, ..., default run, then
again) and each figure is the median over ``--repeats`` rounds, so slow moments of a shared machine spread over
every case alike. ``--compare DIR`` times a second checkout in the same rounds (its ``cl_runner`` comes first
on ``PYTHONPATH``), which gives a before/after pair measured under the same load, e.g.

    git archive HEAD | tar -x -C /tmp/base           # the committed version, beside the working tree
    python scripts/bench_startup.py --compare /tmp/base --out startup.json
    python scripts/bench_startup.py --repeats 5 --skip-run   # the error paths only (a few seconds)

The default run is ``cl-run`` with no overrides (its output goes to a temporary directory). Its phases come from
timestamps that a small wrapper records in the child process, without any change to cl-runner: ``run()``
called and returned (a hook on the import of ``cl_runner.engine.run``), every optimizer step (torch's global optimizer
step hook) and the plots (``plot_run``); the process start and exit are taken in this script around the child.

Fixed cost = (start -> first step) + (last step -> exit) - final evaluation and result files, i.e. the
start-up plus the plots plus the teardown after ``run()`` returned: what every run pays whatever it trains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ERROR_CASES = {"help": ["--help"], "bad lr": ["train.lr=-1"], "bad strategy": ["strategy=bogus"]}

# Runs cl-run's main() in the child and writes the timestamps it saw to $BENCH_MARKS at exit.
WRAPPER = r"""
import atexit, importlib.abc, importlib.util, json, os, sys, time

marks, steps = {}, [0]

def mark(name, again=False):
    if again or name not in marks:
        marks[name] = time.time()

def timed(fn, name):
    def wrapper(*args, **kwargs):
        mark(name + "_start")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(name + "_end")
    return wrapper

def on_step(optimizer, args, kwargs):
    mark("first_step")
    mark("last_step", again=True)
    steps[0] += 1

def patch(module):
    module.run = timed(module.run, "run")
    module.plot_run = timed(module.plot_run, "plot")
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(on_step)

class PatchRun(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "cl_runner.engine.run":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module
        spec.loader.exec_module = lambda module: (run_module(module), patch(module))
        return spec

@atexit.register  # registered first, so it runs after every other exit handler
def write():
    mark("exit_handlers_done")
    with open(os.environ["BENCH_MARKS"], "w") as f:
        json.dump({**marks, "steps": steps[0]}, f)

sys.meta_path.insert(0, PatchRun())
sys.argv = ["cl-run", *sys.argv[1:]]
from cl_runner.cli import main
main()
"""


def child_env(checkout: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def time_error(checkout: Path, args: list[str]) -> float:
    """Seconds from process start to exit of ``cl-run ARGS`` (help or a bad input)."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "cl_runner.cli", *args], cwd=tempfile.gettempdir(), env=child_env(checkout),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.time() - start


def time_run(checkout: Path, args: list[str]) -> dict[str, float]:
    """The phases of one default run, in seconds."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        env = {**child_env(checkout), "BENCH_MARKS": str(Path(tmp) / "marks.json")}
        start = time.time()
        done = subprocess.run([sys.executable, "-c", WRAPPER, f"hydra.run.dir={tmp}/run", *args], cwd=tmp, env=env,
                              capture_output=True, text=True, check=False)
        end = time.time()
        if done.returncode != 0:
            raise SystemExit(f"the default run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        m = json.loads((Path(tmp) / "marks.json").read_text())
    plots = m.get("plot_end", m["run_end"]) - m.get("plot_start", m["run_end"])
    phases = {
        "start -> run()": m["run_start"] - start,
        "run() -> first step": m["first_step"] - m["run_start"],
        "training (first -> last step)": m["last_step"] - m["first_step"],
        "last step -> run() returned": m["run_end"] - m["last_step"],
        "  of which plots": plots,
        "run() returned -> exit": end - m["run_end"],
        "  of which cl-run, Hydra, exit handlers": m["exit_handlers_done"] - m["run_end"],
        "  of which interpreter shutdown": end - m["exit_handlers_done"],
    }
    phases["fixed cost"] = (phases["start -> run()"] + phases["run() -> first step"] + plots
                            + phases["run() returned -> exit"])
    phases["total"] = end - start
    phases["steps"] = m["steps"]
    return phases


def rounds(checkouts: dict[str, Path], repeats: int, skip_run: bool, run_args: list[str]) -> dict:
    """{checkout label: {case: [seconds per round]}} with every case of every checkout interleaved per round."""
    samples: dict[str, dict[str, list[float]]] = {label: {} for label in checkouts}
    for r in range(repeats):
        for label, checkout in checkouts.items():
            for case, args in ERROR_CASES.items():
                samples[label].setdefault(case, []).append(time_error(checkout, args))
        if not skip_run:
            for label, checkout in checkouts.items():
                for phase, value in time_run(checkout, run_args).items():
                    samples[label].setdefault(phase, []).append(value)
        print(f"round {r + 1}/{repeats} done", file=sys.stderr)
    return samples


def table(medians: dict[str, dict[str, float]]) -> str:
    labels = list(medians)
    cases = list(next(iter(medians.values())))
    lines = [f"{'median seconds':32}" + "".join(f"{label:>12}" for label in labels)]
    if len(labels) == 2:
        lines[0] += f"{'ratio':>8}"
    for case in cases:
        values = [medians[label][case] for label in labels]
        row = f"{case:32}" + "".join(f"{v:12.0f}" if case == "steps" else f"{v:12.2f}" for v in values)
        if len(labels) == 2 and values[1] > 0 and case != "steps":
            row += f"{values[0] / values[1]:8.2f}"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--compare", type=Path, help="a second checkout to time in the same rounds (before/after)")
    parser.add_argument("--skip-run", action="store_true", help="time --help and the bad inputs only")
    parser.add_argument("--out", type=Path, help="write the samples, medians and load as JSON")
    parser.add_argument("run_args", nargs="*", help="overrides for the timed run (default: none, the default run)")
    args = parser.parse_args()
    checkouts = {"this": ROOT}
    if args.compare:
        checkouts["compare"] = args.compare.resolve()
    load_before = os.getloadavg()
    samples = rounds(checkouts, args.repeats, args.skip_run, args.run_args)
    medians = {label: {case: statistics.median(v) for case, v in cases.items()} for label, cases in samples.items()}
    load = {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"checkouts: {', '.join(f'{k}={v}' for k, v in checkouts.items())}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load['after']}; {os.cpu_count()} CPUs; "
          f"{args.repeats} interleaved rounds")
    print(table(medians))
    if args.out:
        args.out.write_text(json.dumps({"checkouts": {k: str(v) for k, v in checkouts.items()}, "load": load,
                                        "repeats": args.repeats, "medians": medians, "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
