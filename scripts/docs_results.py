"""Regenerate the results tables of the docs (docs/results/*.md) from real cl-run runs.

Every number in a docs results table comes from here: the script runs the real ``cl-run`` (as
``python -m cl_runner``, in a subprocess, on the CPU, one thread) for each strategy on a task sequence, then builds
Markdown tables from the run directories with ``cl_runner.outputs.report`` (the code behind ``cl-report``). The docs
pages include the files with ``--8<--`` (pymdownx.snippets); never edit them by hand.

    python scripts/docs_results.py                                 # every strategy, default sequence, seed 0
    python scripts/docs_results.py --seeds 0,1,2 --jobs 2          # 3 seeds (report: mean ± std), 2 runs at once
    python scripts/docs_results.py --strategies naive,replay       # rerun some; the tables cover every run kept
    python scripts/docs_results.py --sequences offline_wordnet_senses --strategies naive,joint
    python scripts/docs_results.py --reuse                         # only rebuild the tables from finished runs

Runs go to ``--runs`` (default ``outputs/docs_results/<sequence>/<strategy>`` for the first seed,
``<strategy>_seed<k>`` for the others; git-ignored). The summary and per-strategy pages show the first seed's runs;
the report page is cl-report's table over every run kept, so with several seeds it gives mean ± std per strategy
with the cost columns. A default-sequence run takes 0.3-2.5 min on a shared 2-core CPU; offline_lm_domains takes
several minutes per strategy, so it is not run by default.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cl_runner.outputs.jobs import Job, read_job
from cl_runner.outputs.report import build_report, markdown

ROOT = Path(__file__).resolve().parents[1]

# In the order the docs present them: bounds, then one family after another.
STRATEGIES = ["naive", "joint", "replay", "der", "mer", "agem", "gem", "ewc", "l2", "si", "mas", "ewc_replay", "lwf",
              "adapters", "shared_lora", "ilora", "progressive", "prompt_tuning", "progressive_prompts", "merge",
              "lamol"]
FAMILY = {"naive": "bounds", "joint": "bounds", "replay": "replay", "der": "replay (logits)", "mer": "meta-learning",
          "agem": "gradient projection", "gem": "gradient projection", "ewc": "regularisation",
          "l2": "regularisation", "si": "regularisation", "mas": "regularisation",
          "ewc_replay": "regularisation + replay", "lwf": "distillation", "adapters": "parameter isolation",
          "shared_lora": "parameter isolation (baseline)", "ilora": "parameter isolation + replay",
          "progressive": "parameter isolation", "prompt_tuning": "soft prompts", "progressive_prompts": "soft prompts",
          "merge": "model merging", "lamol": "generative replay"}
# Extra overrides a sequence needs to finish in reasonable time on a CPU (stated in its tables).
SEQUENCE_OVERRIDES = {"offline_lm_domains": ["train.epochs=5"]}


def overrides_for(sequence: str, strategy: str, seed: int) -> list[str]:
    return [f"tasks={sequence}", f"strategy={strategy}", "device=cpu", f"seed={seed}",
            *SEQUENCE_OVERRIDES.get(sequence, [])]


def run_one(run_dir: Path, overrides: list[str]) -> float:
    """One cl-run in a subprocess; its console output goes to run_dir/../<name>.log. Returns wall seconds."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.run([sys.executable, "-m", "cl_runner", *overrides, f"hydra.run.dir={run_dir}"],
                              cwd=run_dir.parent, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"docs_results: cl-run {' '.join(overrides)} exited {proc.returncode}; see {log}")
    return time.perf_counter() - start


def completed(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and read_job(run_dir).status == "completed"


def run_job(runs: Path, sequence: str, strategy: str, seed: int, first: int, reuse: bool) -> None:
    """One strategy and seed: ``runs/<strategy>`` for the first seed, ``runs/<strategy>_seed<k>`` otherwise."""
    run_dir = runs / (strategy if seed == first else f"{strategy}_seed{seed}")
    label = f"[{sequence}] {strategy} seed {seed}"
    if reuse and completed(run_dir):
        print(f"{label}: reusing {run_dir}", flush=True)
        return
    seconds = run_one(run_dir, overrides_for(sequence, strategy, seed))
    print(f"{label}: {seconds:.0f} s, average accuracy {read_job(run_dir).value('average_accuracy'):.3f}",
          flush=True)


# ------------------------------------------------------------------------------------------------ formatting
def num(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{value:+.{digits}f}" if signed and round(value, digits) != 0 else f"{value:.{digits}f}"
    return text.replace("-", "−")


def count(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) or float(value).is_integer() else f"{value:,.3g}"


def compact(value: object) -> str:
    """An accounting value on one line: numbers with separators, dicts as k: v lists."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    return count(int(value)) if isinstance(value, float) and value.is_integer() else count(value)


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)]


def header(today: str) -> list[str]:
    return [f"<!-- generated by scripts/docs_results.py on {today}; do not edit -->", ""]


def setting(job: Job, sequence: str) -> str:
    versions = job.metrics.get("versions", {})
    extra = " ".join(SEQUENCE_OVERRIDES.get(sequence, []))
    return (f"`cl-run tasks={sequence} strategy=<name> device=cpu seed={job.seed}{' ' + extra if extra else ''}`, "
            f"default options otherwise, one run each with `OMP_NUM_THREADS=1` "
            f"(torch {versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}, "
            f"{job.metrics.get('device_name', '?')})")


def summary_page(jobs: list[Job], sequence: str, today: str) -> str:
    higher = all(m != "perplexity" for j in jobs for m in j.metrics.get("metric_per_task", []))
    rows = []
    for job in jobs:
        m, params = job.metrics, job.metrics.get("parameters", {})
        final = params.get("final") or params  # counts after the last task (adapters and columns add some)
        per_task = list((params.get("trainable_per_task") or {}).values())  # what each task's optimizer updated
        trainable = count(per_task[-1] if per_task else final.get("trainable"))  # runs from before: "trainable"
        rows.append([f"`{job.strategy}`", FAMILY.get(job.strategy, ""), num(job.value("average_accuracy")),
                     num(job.value("average_forgetting")),
                     num(job.value("backward_transfer"), signed=True), num(job.value("forward_transfer"), signed=True),
                     num(job.value("average_learning_curve_area")), trainable,
                     count(final.get("total")), num(m.get("wall_time_s"), 1)])
    acc = "final avg acc" if higher else "final avg score (ppl)"
    out = header(today) + [f"Sequence `{sequence}`, {setting(jobs[0], sequence)}. Wall time is the whole run on a "
                           "shared machine and varies from run to run.", ""]
    out += table(["strategy", "family", acc, "avg forgetting", "BWT", "FWT", "LCA", "trainable (last task)",
                  "params at the end", "wall s"], rows)
    return "\n".join(out) + "\n"


def matrix_page(job: Job, sequence: str, today: str) -> str:
    tasks, stages = job.metrics["tasks"], job.metrics["stages"]
    rows = []
    for i, stage in enumerate(stages):
        cells = [num(stage["scores"][t]["score"]) for t in tasks]
        if i > 0:  # the task just trained, in bold
            cells[i - 1] = f"**{cells[i - 1]}**"
        rows.append([f"`{stage['stage']}`", *cells])
    metric = ", ".join(sorted(set(job.metrics.get("metric_per_task", []))))
    out = header(today) + [f"`{job.strategy}` on `{sequence}` (seed {job.seed}; {metric}; bold: the task just "
                           f"trained): average accuracy {num(job.value('average_accuracy'))}, forgetting "
                           f"{num(job.value('average_forgetting'))}, BWT {num(job.value('backward_transfer'))}.", ""]
    out += table(["stage", *[f"{t}" for t in tasks]], rows)
    accounting = job.metrics.get("strategy_accounting") or {}
    if accounting:
        out += ["", "Strategy accounting (`metrics.json` → `strategy_accounting`): "
                + "; ".join(f"`{k}` {compact(v)}" for k, v in accounting.items()) + "."]
    return "\n".join(out) + "\n"


def report_page(runs: Path, today: str) -> str:
    """The cl-report table of every run of the sequence, exactly as `cl-report <dir>` writes report.md."""
    text = markdown(build_report([runs]))
    text = text.replace("# cl-report\n", "").replace(f"`{runs}`", f"`outputs/docs_results/{runs.name}`")
    return "\n".join(header(today)) + "\n" + text.lstrip("\n")


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated strategies to run (default: all)")
    parser.add_argument("--sequences", default="default", help="comma-separated task sequences (default: default)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (the pages show the first one's runs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each one thread)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="where the .md tables go")
    parser.add_argument("--runs", type=Path, default=Path("outputs/docs_results"), help="where the runs go")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs instead of running them again")
    args = parser.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {', '.join(unknown)}; expected some of {', '.join(STRATEGIES)}")
    today = dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    for sequence in [s for s in args.sequences.split(",") if s]:
        runs = args.runs.resolve() / sequence
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_job, runs, sequence, strategy, seed, seeds[0], args.reuse)
                       for seed in seeds for strategy in strategies]
            for future in futures:
                future.result()
        order = {s: i for i, s in enumerate(STRATEGIES)}
        jobs = sorted((read_job(d) for d in runs.iterdir() if d.is_dir() and "_seed" not in d.name and completed(d)),
                      key=lambda j: order.get(j.strategy, len(order)))
        if not jobs:
            raise SystemExit(f"docs_results: no completed run under {runs}")
        written = [args.out / f"{sequence}_summary.md", args.out / f"{sequence}_report.md"]
        written[0].write_text(summary_page(jobs, sequence, today), encoding="utf-8")
        written[1].write_text(report_page(runs, today), encoding="utf-8")
        for job in jobs:
            path = args.out / f"{sequence}_{job.strategy}.md"
            path.write_text(matrix_page(job, sequence, today), encoding="utf-8")
            written.append(path)
        print(f"{sequence}: wrote {len(written)} tables to {args.out} from {len(jobs)} runs", flush=True)


if __name__ == "__main__":
    main()
