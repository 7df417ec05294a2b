"""The first GPU's checklist, in one command: install what the machine lacks, run the GPU tests and the benchmarks,
and write one JSON of figures. Made for a lent machine with one GPU, no network and a few minutes (docs/gpus.md).

Steps, each a subprocess with its own time limit inside one overall budget (``--budget``, default 450 s: the whole
check stays under 8 minutes), in this order (cheap and essential first, so a cut-off still leaves figures):

1. ``install``: when ``wheelhouse/`` exists (``scripts/build_wheelhouse.sh`` builds it where PyPI is reachable), ``pip
   install --no-index --find-links wheelhouse hydra-core omegaconf``; then ``install_datasets``: ``datasets`` on its
   own (only tasks with ``source=datasets`` need it; no step below does, so a failure there is recorded and the
   check goes on).
2. ``distributed``: ``scripts/bench_distributed.py --nproc 1``: one process (``distributed=none``) against
   ``torchrun --nproc_per_node=1`` jobs with ``distributed=ddp`` and ``distributed=fsdp`` (NCCL, bf16 autocast; fsdp
   gathers bf16 weights and reduces gradients in fp32): tokens/s, GPU and host memory of each.
3. ``pytest_gpu``: ``pytest -m gpu`` over the test files that hold GPU tests (bf16 and fp16 runs, pinned copies,
   NCCL vs one process, the strategies' CUDA paths): counts and each test's seconds.
4. ``bench_loop``: ``scripts/bench_loop.py``: GPT-2 small and medium, 16 x 512 tokens, bf16: cl-runner's loop
   against a plain loop, a compiled one and HF Trainer (tokens/s, MFU, peak memory).
5. ``bench_strategies``: ``scripts/bench_strategies.py``: every strategy's step time against naive on GPT-2 small,
   the Fisher estimate (batched vs per example) and each strategy's state memory.

The JSON (``--out``; default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``gpu_check.json``) holds the
machine (GPU, driver, torch, Python), each step's status (ok | failed | timed out | skipped), seconds, exit code,
the last lines of its output, and its figures (the benchmarks' own JSON reports; pytest's counts and durations),
plus a ``summary`` of the headline figures. It is rewritten after every step, so a check cut off by its caller
still leaves what was measured. The full output of every step goes to ``gpu_check.log`` beside it.

``--dry-run`` runs the same steps at tiny sizes on the CPU (minutes on 2 cores: a proof that the script, the
benchmarks' options and the report work, not figures). Without ``--dry-run`` it needs a CUDA device and refuses
to start without one.

    python scripts/gpu_check.py                      # on the GPU machine
    python scripts/gpu_check.py --out /tmp/gpu.json --budget 420
    python scripts/gpu_check.py --dry-run --out /tmp/dry.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
PY = sys.executable

# step: (seconds it may take at most, seconds kept for it while earlier steps run)
LIMITS = {"install": (60, 15), "install_datasets": (45, 10), "distributed": (100, 40), "pytest_gpu": (180, 60),
          "bench_loop": (240, 90), "bench_strategies": (150, 45)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="the JSON report (default $OUT/gpu_check.json)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all the steps together")
    p.add_argument("--wheelhouse", type=Path, default=REPO / "wheelhouse", help="wheels to install offline")
    p.add_argument("--steps", default=",".join(LIMITS), help=f"comma-separated subset of {','.join(LIMITS)}")
    p.add_argument("--dry-run", action="store_true", help="the same steps at tiny sizes on the CPU")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(args.steps) - set(LIMITS))
    if unknown or not args.steps:
        p.error(f"--steps: unknown {', '.join(unknown) or 'empty list'}; expected names from {', '.join(LIMITS)}")
    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    return args


def commands(args: argparse.Namespace, work: Path) -> dict[str, list[list[str]]]:
    """Each step's command lines (run one after another); every benchmark writes its JSON into ``work``."""
    pip = [PY, "-m", "pip", "install", "--no-index", "--find-links", str(args.wheelhouse), "--quiet"]
    gpu_tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                       if "mark.gpu" in p.read_text())
    if args.dry_run:  # tiny sizes on the CPU: the same scripts and report, no figures worth keeping
        distributed = ["--device", "cpu", "--size", "tiny", "--examples", "8", "--epochs", "1", "--threads", "1"]
        # no compiled contender: cl-runner compiles on CUDA only, and inductor's CPU build takes minutes here
        sizes, loop = ["tiny"], ["--device", "cpu", "--rounds", "1", "--block", "1", "--warmup", "1", "--threads", "1",
                                 "--batch-size", "4", "--seq-len", "32", "--contenders", "cl_runner,plain,hf_trainer"]
        strategies = ["--device", "cpu", "--strategies", "naive,ewc,replay,lwf", "--rounds", "1", "--block", "1",
                      "--warmup", "1", "--setup-steps", "1", "--fisher-samples", "8", "--batch-size", "4",
                      "--seq-len", "32", "--threads", "1"]
    else:  # sizes from the scripts' CUDA defaults (GPT-2 small and medium, 16 x 512, bf16); fewer rounds
        distributed = ["--device", "cuda", "--size", "85m", "--examples", "32", "--epochs", "2"]
        sizes, loop = ["gpt2", "gpt2-medium"], ["--device", "cuda", "--rounds", "3", "--block", "10", "--warmup", "3"]
        strategies = ["--device", "cuda", "--rounds", "3", "--block", "5", "--warmup", "2"]
    return {
        "install": [[*pip, "hydra-core", "omegaconf"]] if args.wheelhouse.is_dir() else [],
        "install_datasets": [[*pip, "datasets"]] if args.wheelhouse.is_dir() else [],
        "distributed": [[PY, str(SCRIPTS / "bench_distributed.py"), "--nproc", "1", *distributed,
                         "--out", str(work / "distributed.json")]],
        "pytest_gpu": [[PY, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q", "-m", "gpu",
                        f"--junitxml={work / 'pytest_gpu.xml'}", *gpu_tests]],
        # one process per size: a size that fails or runs out of time leaves the other's figures
        "bench_loop": [[PY, str(SCRIPTS / "bench_loop.py"), "--sizes", size, *loop,
                        "--out", str(work / f"bench_loop_{size}.json")] for size in sizes],
        "bench_strategies": [[PY, str(SCRIPTS / "bench_strategies.py"), *strategies,
                              "--out", str(work / "bench_strategies.json")]],
    }


def machine() -> dict:
    """What the figures were measured on (torch is imported in a subprocess: this script needs nothing but Python)."""
    probe = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if c else None, "
             "'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None, "
             "'bf16': torch.cuda.is_bf16_supported() if c else None}))")
    done = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=120)
    info = json.loads(done.stdout) if done.returncode == 0 else {"torch": None, "error": done.stderr[-500:]}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True) if _which("nvidia-smi") else None
    return {**info, "nvidia_smi": smi.stdout.strip() if smi and smi.returncode == 0 else None,
            "python": platform.python_version(), "cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())}


def _which(name: str) -> bool:
    return any((Path(d) / name).exists() for d in os.environ.get("PATH", "").split(os.pathsep) if d)


def run_step(lines: list[list[str]], timeout: float, log) -> dict:
    """Run a step's commands in turn (each whatever the previous one's exit code) until the step's time is
    spent."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    started, tail, codes = time.monotonic(), "", []
    for line in lines:
        left = timeout - (time.monotonic() - started)
        log.write(f"\n$ {' '.join(line)}\n")
        log.flush()
        try:
            done = subprocess.run(line, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(1.0, left))
        except subprocess.TimeoutExpired as exc:
            text = _text(exc.stdout) + _text(exc.stderr)
            log.write(text)
            return {"status": "timed out", "seconds": round(time.monotonic() - started, 1), "returncodes": codes,
                    "tail": text[-3000:]}
        log.write(done.stdout + done.stderr)
        codes.append(done.returncode)
        tail += (done.stdout + done.stderr)[-3000 // len(lines):]
    status = "ok" if all(c == 0 for c in codes) else "failed"
    return {"status": status, "seconds": round(time.monotonic() - started, 1), "returncodes": codes, "tail": tail}


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def figures(step: str, work: Path) -> dict | None:
    """The step's own report: a benchmark's JSON, pytest's counts and per-test seconds."""
    if step == "pytest_gpu":
        path = work / "pytest_gpu.xml"
        if not path.exists():
            return None
        suite = ElementTree.parse(path).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        tests = {}
        for case in suite.iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            tests[f"{case.get('classname')}::{case.get('name')}"] = {"outcome": outcome,
                                                                      "seconds": float(case.get("time", 0))}
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        return {**counts, "seconds": float(suite.get("time", 0)), "cases": tests}
    if step == "bench_loop":  # the sizes' reports in one, as one bench_loop.py run over all sizes writes it
        reports = [json.loads(p.read_text()) for p in sorted(work.glob("bench_loop_*.json"))]
        return {**reports[0], "sizes": {k: v for r in reports for k, v in r["sizes"].items()}} if reports else None
    path = work / f"{step}.json"
    return json.loads(path.read_text()) if path.exists() else None


def summary(steps: dict) -> dict:
    """The headline figures, read defensively from whatever the steps reported."""
    out: dict = {}
    loop = (steps.get("bench_loop") or {}).get("figures") or {}
    for size, report in (loop.get("sizes") or {}).items():
        out[f"loop_{size}"] = {name: {k: r.get(k) for k in ("tokens_per_s", "mfu", "peak_memory_mib", "vs_plain",
                                                            "error") if k in r}
                               for name, r in (report.get("contenders") or {}).items()}
        out[f"loop_{size}"]["cl_runner_vs"] = report.get("cl_runner_vs")
    strategies = (steps.get("bench_strategies") or {}).get("figures") or {}
    if strategies.get("strategies"):
        out["strategy_step_vs_naive"] = {name: row.get("vs_naive") for name, row in strategies["strategies"].items()
                                         if isinstance(row, dict)}
        out["fisher_speedup"] = (strategies.get("fisher") or {}).get("speedup")
    distributed = (steps.get("distributed") or {}).get("figures") or {}
    out["distributed"] = {kind: {k: row.get(k) for k in ("status", "tokens_per_s", "cuda_peak_mib", "peak_rss_mib")}
                          for kind, row in (distributed.get("kinds") or {}).items()}
    tests = (steps.get("pytest_gpu") or {}).get("figures") or {}
    if tests:
        out["pytest_gpu"] = {k: tests.get(k) for k in ("tests", "failures", "errors", "skipped", "seconds")}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = {"dry_run": args.dry_run, "budget_s": args.budget, "machine": machine(), "steps": {}}
    if not args.dry_run and not report["machine"].get("gpu"):
        print("gpu_check: no CUDA device is visible; on a machine without one, run it with --dry-run",
              file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    deadline = time.monotonic() + args.budget
    lines = commands(args, work)
    with open(args.out.with_name("gpu_check.log"), "w") as log:
        for i, step in enumerate(args.steps):
            kept = sum(LIMITS[s][1] for s in args.steps[i + 1:])  # so one slow step cannot starve the rest
            timeout = min(LIMITS[step][0], deadline - time.monotonic() - kept)
            if not lines[step] or timeout < 5:
                why = "no wheelhouse" if not lines[step] else "out of time"
                report["steps"][step] = {"status": f"skipped ({why})"}
            else:
                print(f"gpu_check: {step} (at most {timeout:.0f} s)", flush=True)
                report["steps"][step] = {**run_step(lines[step], timeout, log), "figures": figures(step, work)}
                print(f"gpu_check: {step} {report['steps'][step]['status']} in "
                      f"{report['steps'][step]['seconds']} s", flush=True)
            report["summary"] = summary(report["steps"])
            report["total_s"] = round(args.budget - (deadline - time.monotonic()), 1)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [s for s, r in report["steps"].items() if r["status"] not in ("ok",) and not
              re.match(r"skipped \(no wheelhouse\)", r["status"])]
    print(f"gpu_check: wrote {args.out} in {report['total_s']} s; " +
          (f"not ok: {', '.join(failed)}" if failed else "every step ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
