"""Memory per rank and tokens/s of ``distributed=none`` (1 process) vs ``ddp`` vs ``fsdp`` (N processes), through the
real run: every process calls ``cl_runner.engine.run.run`` on the composed config (``torchrun --standalone`` starts the
N-process jobs), on a GPT-2 built from a config (``--size``; nothing downloaded) and one bundled facts task.

Each process writes ``<runs>/<kind>-<repeat>/rank<r>.json`` (``--keep``, else a temporary directory): its peak host
memory (``resource.getrusage`` ``ru_maxrss``: peak RSS, the model build, evaluation and everything else included),
its RSS before the run started (imports, process group not yet joined), and on CUDA
``torch.cuda.max_memory_allocated``. Tokens/s are the loop's own figure from the run's ``history.jsonl`` (its last
epoch, so the first steps' set-up is left out): rank 0's tokens/s, and x N for the job (every rank trains the same
number of examples of each global batch). Kinds run one after another in one script (``--repeats`` interleaves
them); the table gives the ratio of each kind's peak per rank to ddp's (GPU memory on CUDA, else host RSS). Threads:
one process gets ``--threads`` (default: all cores), each of N ranks 1/N of them. ``--device cuda``: one GPU per
rank (``--nproc`` <= GPUs), NCCL, bf16 autocast, and for fsdp bf16 gathered weights with fp32 gradient reduction.

``--cap MIB`` runs every kind under a per-process memory cap: ``RLIMIT_DATA`` (``ulimit -d``; since Linux 4.7 it
counts every private writable mapping: heap and anonymous mmap, where CPU tensors live), set on the launched process
and inherited by each rank. ``RLIMIT_AS`` (``ulimit -v``) would also count the shared libraries' address space (~0.4
GiB of torch's own, ~0.7 GiB in all before any tensor), and a cgroup caps a group, not a process. A job's status is
``out of memory`` when a rank reports an allocation error (torch's "can't allocate memory", Python's MemoryError;
torchrun then stops the other ranks), ``failed`` for any other error. Sizes: fp32 weights + gradients + AdamW's two
moments take 16 bytes per parameter in one process; fsdp keeps 1/N of each per rank (plus the full model while it is
built, before sharding, and one block's gathered weights at a time).

    python scripts/bench_distributed.py                              # small model, none vs ddp vs fsdp
    python scripts/bench_distributed.py --size 200m --examples 8 --out bench_distributed.json
    python scripts/bench_distributed.py --size 200m --examples 8 --cap 2800   # fsdp trains, ddp and none fail
    python scripts/bench_distributed.py --device cuda --nproc 8 --size 1b   # GPUs: NCCL, bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

KINDS = ("none", "ddp", "fsdp")
SIZES = {  # GPT-2 shapes (vocabulary: the 1024-token BPE trained on the task text); {} = conf/model/tiny.yaml's
    "tiny": {},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "85m": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "200m": {"n_layer": 16, "n_embd": 1024, "n_head": 16},
    "1b": {"n_layer": 24, "n_embd": 1920, "n_head": 16},
}
OOM_SIGNS = ("can't allocate memory", "Cannot allocate memory", "MemoryError", "out of memory",
             "not enough memory")
MIB = 1 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=tuple(SIZES), default="small")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of none,ddp,fsdp")
    p.add_argument("--nproc", type=int, default=2, help="processes of the ddp and fsdp jobs")
    p.add_argument("--examples", type=int, default=32, help="training examples of the one task")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (train.batch_size)")
    p.add_argument("--epochs", type=int, default=2, help="tokens/s is the last epoch's")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the kinds (interleaved)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of the job, split over ranks")
    p.add_argument("--cap", type=int, default=None, help="per-process memory cap in MiB (RLIMIT_DATA)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--keep", type=Path, default=None, help="keep the runs' directories here (default: temporary)")
    args = p.parse_args(argv)
    bad = set(args.kinds.split(",")) - set(KINDS)
    if bad:
        p.error(f"--kinds: expected a subset of {','.join(KINDS)}, got {','.join(sorted(bad))}")
    if args.nproc < 1:
        p.error("--nproc: expected at least 1")
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        p.error(f"--keep: expected a new or empty directory, {args.keep} holds files (ranks' reports would mix)")
    return args


def overrides(args: argparse.Namespace, kind: str, nproc: int) -> list[str]:
    """The run's config overrides: the model, one facts task of ``--examples`` examples, no checkpoints."""
    task = f"{{name:color,source:facts,relation:color,num_subjects:{args.examples},metric:exact_match}}"
    arch = [f"+model.arch.{k}={v}" if k not in ("n_layer", "n_embd", "n_head") else f"model.arch.{k}={v}"
            for k, v in SIZES[args.size].items()]
    device = ([f"device.threads={max(1, args.threads // nproc)}"] if args.device == "cpu"
              else ["distributed.param_dtype=bfloat16", "distributed.reduce_dtype=float32"] * (kind == "fsdp"))
    return [*arch, f"device={args.device}", f"distributed={kind}", f"tasks.tasks=[{task}]",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.max_steps=null",
            "train.keep_best=false", "checkpoint.enabled=false", *device]


def launch(args: argparse.Namespace, kind: str, out: Path) -> dict:
    """One job of ``kind`` (1 process for none, else ``--nproc`` under torchrun), its ranks' reports and speed."""
    nproc = 1 if kind == "none" else args.nproc
    worker = [str(Path(__file__).resolve()), "--worker", str(out), *overrides(args, kind, nproc)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [sys.executable, *worker] if kind == "none" else [*torchrun, *worker]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(max(1, args.threads // nproc))}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=args.timeout,
                          preexec_fn=None if args.cap is None else partial(cap_memory, args.cap * MIB))
    ranks = [read_json(out / f"rank{r}.json") for r in range(nproc)]
    return summarize(kind, nproc, ranks, out / "run", done, time.perf_counter() - started)


def cap_memory(limit: int) -> None:
    """``ulimit -d``: this process and the ranks it starts may each map at most ``limit`` bytes of data."""
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(kind: str, nproc: int, ranks: list[dict | None], run_dir: Path,
              done: subprocess.CompletedProcess, wall_s: float) -> dict:
    """The job's row: status (ok | out of memory | failed), what the run reached, memory per rank, tokens/s."""
    errors = [r["error"] for r in ranks if r and r.get("error")]
    text = "\n".join(errors) + done.stderr[-20000:]
    status = "ok" if done.returncode == 0 and len(errors) == 0 else (
        "out of memory" if any(sign in text for sign in OOM_SIGNS) else "failed")
    metrics = read_json(run_dir / "metrics.json") or {}  # rank 0 writes it, also when the run fails
    history = read_lines(run_dir / "history.jsonl")
    speed = history[-1]["tokens_per_s"] if history and status == "ok" else None
    peaks = [r["peak_rss_mib"] for r in ranks if r]
    return {"kind": kind, "processes": nproc, "status": status, "returncode": done.returncode,
            "parameters": metrics.get("parameters", {}).get("total"),
            "reached": {"stages": [s["stage"] for s in metrics.get("stages", [])], "epochs": len(history)},
            "peak_rss_mib_per_rank": peaks, "peak_rss_mib": max(peaks, default=None),
            "baseline_rss_mib": max((r["baseline_rss_mib"] for r in ranks if r), default=None),
            "cuda_peak_mib": max((r["cuda_peak_mib"] or 0 for r in ranks if r), default=None) or None,
            # the loop counts every rank's tokens of each step (the job's rate): per rank is that / processes
            "tokens_per_s": speed, "tokens_per_s_per_rank": None if speed is None else speed / nproc,
            "wall_s": round(wall_s, 1),
            "errors": [e[:300] for e in errors] or ([done.stderr.strip()[-300:]] if status != "ok" else [])}


def read_lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except (OSError, ValueError):
        return []


def worker(out: Path, config_overrides: list[str]) -> int:
    """One rank of a job: compose the config, ``run()`` it, write this rank's memory figures (also on failure)."""
    import torch
    from bench_loop import compose_config
    from rich.console import Console

    from cl_runner.core import dist
    from cl_runner.engine.run import run

    rank = int(os.environ.get("RANK", "0"))
    report = {"rank": rank, "baseline_rss_mib": rss_mib(), "error": None}
    try:
        run(compose_config(*config_overrides), out / "run", console=Console(quiet=True))
    except BaseException as exc:  # noqa: BLE001 - reported, then the job fails
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_initialized() else None)
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.leave()
    return 1 if report["error"] else 0


def rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024 if "VmRSS:" in status else 0.0


def median_rows(rows: list[dict]) -> dict:
    """One kind over the repeats: the highest peak memory and the median tokens/s (the first row otherwise)."""
    ok = [r for r in rows if r["status"] == "ok"] or rows
    speeds = [r["tokens_per_s"] for r in ok if r["tokens_per_s"]]
    return {**ok[0], "peak_rss_mib": max((r["peak_rss_mib"] or 0 for r in ok), default=None),
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "tokens_per_s_repeats": speeds}


def add_ratios(rows: dict[str, dict]) -> None:
    """Each kind's peak per rank over ddp's: GPU memory where measured (CUDA), else host RSS."""
    key = "cuda_peak_mib" if any(r["cuda_peak_mib"] for r in rows.values()) else "peak_rss_mib"
    ddp = rows.get("ddp", {}).get(key)
    for row in rows.values():
        row["memory_vs_ddp"] = round(row[key] / ddp, 3) if ddp and row[key] else None


def table(report: dict) -> str:
    lines = [f"{'kind':<6} {'procs':>5} {'params':>12} {'peak/rank MiB':>14} {'vs ddp':>7} {'base MiB':>9} "
             f"{'GPU MiB':>8} {'tok/s':>9} {'tok/s/rank':>10}  status"]
    for row in report["kinds"].values():
        cells = [row["kind"], row["processes"], row["parameters"], row["peak_rss_mib"], row["memory_vs_ddp"],
                 row["baseline_rss_mib"], row["cuda_peak_mib"], row["tokens_per_s"], row["tokens_per_s_per_rank"]]
        text = [_cell(c) for c in cells]
        lines.append(f"{text[0]:<6} {text[1]:>5} {text[2]:>12} {text[3]:>14} {text[4]:>7} {text[5]:>9} "
                     f"{text[6]:>8} {text[7]:>9} {text[8]:>10}  {row['status']}")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    kinds = [k for k in KINDS if k in args.kinds.split(",")]
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    load_start = os.getloadavg()
    for repeat in range(args.repeats):
        for kind in kinds:
            out = root / f"{kind}-{repeat}"
            out.mkdir(parents=True)
            runs[kind].append(launch(args, kind, out))
    rows = {k: median_rows(v) for k, v in runs.items()}
    add_ratios(rows)
    params = next((r["parameters"] for r in rows.values() if r["parameters"]), None)
    report = {"device": args.device, "size": args.size, "arch": SIZES[args.size], "nproc": args.nproc,
              "parameters": params, "fp32_weights_grads_adamw_mib": params and round(16 * params / MIB),
              "cap_mib": args.cap, "cap_mechanism": "RLIMIT_DATA" if args.cap else None,
              "load_start": load_start, "load_end": os.getloadavg(), "kinds": rows, "runs_dir": str(root)}
    print(table(report))
    if args.cap:
        print(f"cap {args.cap} MiB per process (RLIMIT_DATA; fp32 weights + gradients + AdamW: "
              f"{report['fp32_weights_grads_adamw_mib']} MiB): " + ", ".join(
                  f"{k} {r['status']} (reached {'+'.join(r['reached']['stages']) or 'nothing'}, "
                  f"{r['reached']['epochs']} epochs)" for k, r in rows.items()))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker(Path(sys.argv[2]), sys.argv[3:]))
    main()
