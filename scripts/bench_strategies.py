"""Benchmark the continual-learning strategies' overhead: step time against naive, Fisher speed, state memory.

What it measures, all in one process so that the ratios compare like with like:

1. Training-step time per strategy, as a ratio to naive, through the real loop (``cl_runner.engine.loop.train_task``).
   Every strategy (all of conf/strategy/*.yaml by default, with their shipped options) gets the same initial
   weights and is first trained on task 0 for ``--setup-steps`` steps, so that its real ``after_task`` sets up
   its state (buffer filled, Fisher estimated, teacher copied, adapter or column added); the time from task 0's
   last step to the end of ``train_task`` is ``setup_s``. Then each strategy trains task 1 in one
   ``train_task`` that pauses at every optimizer step (see ``Relay`` in bench_loop.py): after ``--warmup``
   steps each, the strategies take turns of ``--block`` steps for ``--rounds`` rounds, timed between device
   syncs, and the median is reported. ``ex/step`` counts the examples the strategy's ``train_batches`` hands
   the loop per optimizer step (replay adds its buffer share); ``vs naive/tok`` compares time per token.
2. Fisher estimation: examples/s of ``fisher_diagonal_loop`` (one backward per example) against the batched
   ``fisher_diagonal`` (vmap of per-example gradients) on the same examples, and their max abs difference.
3. Memory of the strategies' state, from their ``accounting()``: EWC's Fisher + anchor, L2's anchor, LwF's
   teacher copy, replay's buffer, adapters' and columns' parameters.

Models (built from a config, nothing downloaded; sizes as in bench_loop.py): CPU ``tiny`` (conf/model/tiny.yaml),
batch 8 x 64 tokens, fp32; CUDA ``gpt2`` (GPT-2 small, 124M), batch 16 x 512, bf16 autocast. Examples are random
tokens; the second half of each is the target. torch's thread count is left as users get it (``--threads``).

    python scripts/bench_strategies.py                       # CPU defaults: a minute or two
    python scripts/bench_strategies.py --device cuda --out bench.json
    python scripts/bench_strategies.py --strategies naive,ewc --rounds 7 --batch-size 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from bench_loop import (
    SIZES,
    Relay,
    build_model,
    compose_config,
    environment,
    load_line,
    make_context,
    progress,
    random_rows,
    step_callbacks,
    sync,
    timed_block,
    train_task_target,
)

from cl_runner.cli import CONF_DIR
from cl_runner.engine.loop import TaskRun, train_task
from cl_runner.strategies import build_strategy
from cl_runner.strategies.base import Context
from cl_runner.strategies.fisher import fisher_diagonal, fisher_diagonal_loop

ALL = tuple(sorted((p.stem for p in (CONF_DIR / "strategy").glob("*.yaml")), key=lambda n: (n != "naive", n)))
DEFAULT_SIZE = {"cpu": "tiny", "cuda": "gpt2"}


def make_task(task: int, n: int, seq_len: int, vocab: int) -> list[dict]:
    """Random examples: a prompt ending in a fixed answer cue (LAMOL needs one), a target ending in EOS (0)."""
    half, cue = seq_len // 2, [1, 2]
    rows = [row[: half - len(cue)] + cue + row[half:-1] + [0] for row in random_rows(task, n, seq_len, vocab)]
    return [{"input_ids": row, "labels": [-100] * half + row[half:], "task_id": task} for row in rows]


class Counted:
    """Counts the examples and tokens a strategy's ``train_batches`` hands the loop."""

    def __init__(self, train_batches: Callable[[Context, Iterable[list[dict]]], Iterator[list[dict]]]) -> None:
        self.train_batches, self.examples, self.tokens = train_batches, 0, 0

    def __call__(self, ctx: Context, batches: Iterable[list[dict]]) -> Iterator[list[dict]]:
        for batch in self.train_batches(ctx, batches):
            self.examples += len(batch)
            self.tokens += sum(len(e["input_ids"]) for e in batch)
            yield batch


def strategy_config(name: str, args: argparse.Namespace):
    cfg = compose_config(f"device={args.device}", f"strategy={name}", f"train.batch_size={args.batch_size}")
    if hasattr(cfg.strategy, "fisher_samples"):
        cfg.strategy.fisher_samples = args.fisher_samples
    return cfg


def set_up(name: str, args: argparse.Namespace, model: torch.nn.Module, train_sets: list[list[dict]]) -> dict:
    """Train task 0 briefly through ``train_task`` (its ``after_task`` timed), then relay task 1."""
    cfg = strategy_config(name, args)
    ctx = make_context(cfg, copy.deepcopy(model), train_sets)
    strategy = build_strategy(cfg.strategy)
    last_step = []

    def mark() -> None:
        sync(ctx.device)
        last_step.append(time.perf_counter())

    train_task(TaskRun(ctx=ctx, strategy=strategy, examples=train_sets[0], validate=lambda tasks: 0.0,
                       cfg=dataclasses.replace(cfg.train, max_steps=args.setup_steps, keep_best=False),
                       callbacks=step_callbacks(mark)))
    sync(ctx.device)
    setup = time.perf_counter() - last_step[-1]
    ctx.task_index = 1
    counted = strategy.train_batches = Counted(strategy.train_batches)
    steps = args.warmup + args.rounds * args.block
    relay = Relay(train_task_target(ctx, strategy, train_sets[1], cfg, steps))
    return {"relay": relay, "strategy": strategy, "counted": counted, "setup_s": setup, "steps": steps,
            "times": [], "ctx": ctx}


def bench_steps(args: argparse.Namespace, model: torch.nn.Module, train_sets: list[list[dict]]) -> dict[str, dict]:
    runs = {}
    for name in args.strategies:
        progress(f"setting up {name}")
        runs[name] = set_up(name, args, model, train_sets)
    device = next(iter(runs.values()))["ctx"].device
    for run in runs.values():
        run["relay"].run(args.warmup)
    for round_ in range(args.rounds):
        progress(f"round {round_ + 1}/{args.rounds}")
        for run in runs.values():
            run["times"].append(timed_block(device, run["relay"].run, args.block))
    for run in runs.values():
        run["relay"].close()
    results = {}
    for name, run in runs.items():
        counted, steps = run["counted"], run["steps"]
        results[name] = {"step_ms": 1000 * statistics.median(run["times"]),
                         "step_ms_spread": [1000 * min(run["times"]), 1000 * max(run["times"])],
                         "examples_per_step": counted.examples / steps, "tokens_per_step": counted.tokens / steps,
                         "setup_s": run["setup_s"], "accounting": run["strategy"].accounting()}
    base = results.get("naive")
    for r in results.values():
        r["vs_naive"] = None if base is None else r["step_ms"] / base["step_ms"]
        r["vs_naive_per_token"] = None if base is None else (
            r["step_ms"] / r["tokens_per_step"] / (base["step_ms"] / base["tokens_per_step"]))
    return results


def bench_fisher(args: argparse.Namespace, model: torch.nn.Module, train_sets: list[list[dict]]) -> dict:
    ctx = make_context(strategy_config("naive", args), copy.deepcopy(model), train_sets)
    examples = train_sets[0][: args.fisher_samples]
    fisher_diagonal(ctx, examples[:2], batch_size=2)  # one-time costs (kernels, functorch) out of the timing
    fisher_diagonal_loop(ctx, examples[:2])
    timings, values = {}, {}
    for label, fn in (("loop", fisher_diagonal_loop),
                      ("batched", functools.partial(fisher_diagonal, batch_size=args.fisher_batch_size))):
        sync(ctx.device)
        start = time.perf_counter()
        values[label] = fn(ctx, examples)
        sync(ctx.device)
        timings[label] = time.perf_counter() - start
    diff = max(float((values["loop"][n] - values["batched"][n]).abs().max()) for n in values["loop"])
    scale = max(float(f.abs().max()) for f in values["loop"].values())
    return {"examples": len(examples), "loop_examples_per_s": len(examples) / timings["loop"],
            "batched_examples_per_s": len(examples) / timings["batched"],
            "speedup": timings["loop"] / timings["batched"], "max_abs_diff": diff, "max_abs_fisher": scale,
            "fisher_batch_size": args.fisher_batch_size}


def describe_state(accounting: dict) -> str:
    parts = []
    for key, value in accounting.items():
        if key.endswith("_bytes"):
            parts.append(f"{key.removesuffix('_bytes')} {value / 2**20:.2f} MiB")
        elif key in ("buffer_examples", "buffer_tokens"):
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "-"


def print_steps(steps: dict[str, dict]) -> None:
    print(f"\n{'strategy':<12} {'step ms':>9} {'min-max ms':>15} {'vs naive':>9} {'vs naive/tok':>12} "
          f"{'ex/step':>8} {'setup s':>8}  state")
    for name, r in steps.items():
        ratio = "-" if r["vs_naive"] is None else f"{r['vs_naive']:.2f}x"
        per_token = "-" if r["vs_naive_per_token"] is None else f"{r['vs_naive_per_token']:.2f}x"
        spread = "{:.2f}-{:.2f}".format(*r["step_ms_spread"])
        print(f"{name:<12} {r['step_ms']:>9.2f} {spread:>15} {ratio:>9} {per_token:>12} "
              f"{r['examples_per_step']:>8.1f} {r['setup_s']:>8.2f}  {describe_state(r['accounting'])}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--size", default=None, choices=tuple(SIZES), help="model (CPU tiny, CUDA gpt2)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per strategy (median reported)")
    parser.add_argument("--block", type=int, default=10, help="optimizer steps per strategy per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per strategy on task 1 first")
    parser.add_argument("--setup-steps", type=int, default=2, help="steps on task 0 before its after_task")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default per size)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example (default per size)")
    parser.add_argument("--strategies", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--fisher-samples", type=int, default=None, help="examples for the Fisher (CPU 32, CUDA 64)")
    parser.add_argument("--fisher-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.size = args.size or DEFAULT_SIZE[args.device]
    args.batch_size = args.batch_size or SIZES[args.size]["batch"]
    args.seq_len = args.seq_len or SIZES[args.size]["seq_len"]
    args.fisher_samples = args.fisher_samples or (64 if args.device == "cuda" else 32)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(args.strategies) - set(ALL))
    if unknown or not args.strategies:
        parser.error(f"--strategies: unknown {', '.join(unknown) or 'empty list'}; expected names from "
                     f"{', '.join(ALL)}")
    if min(args.rounds, args.block, args.warmup, args.setup_steps) < 1:
        parser.error("--rounds, --block, --warmup, --setup-steps: expected positive integers")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = environment(torch.device(args.device))
    model = build_model(args.size, compose_config(f"device={args.device}"))
    vocab, params = model.config.vocab_size, sum(p.numel() for p in model.parameters())
    n_examples = max(args.batch_size * (args.warmup + args.rounds * args.block), args.fisher_samples)
    train_sets = [make_task(t, n_examples, args.seq_len, vocab) for t in range(2)]
    print(f"device {report['device']} ({report['device_name']}), {report['threads']} torch threads; {args.size}: "
          f"{params / 1e6:.2f}M parameters, batch {args.batch_size} x {args.seq_len} tokens; {load_line()}")
    steps = bench_steps(args, model, train_sets)
    print_steps(steps)
    fisher = bench_fisher(args, model, train_sets)
    print(f"\nFisher on {fisher['examples']} examples: loop {fisher['loop_examples_per_s']:.1f} ex/s, batched "
          f"{fisher['batched_examples_per_s']:.1f} ex/s (x{fisher['speedup']:.2f}, fisher_batch_size "
          f"{args.fisher_batch_size}); max |loop - batched| {fisher['max_abs_diff']:.3g} "
          f"(max |F| {fisher['max_abs_fisher']:.3g})")
    print(load_line())
    report.update(size=args.size, parameters=params, batch_size=args.batch_size, seq_len=args.seq_len,
                  rounds=args.rounds, block=args.block, warmup=args.warmup, strategies=steps, fisher=fisher,
                  loadavg_end=list(os.getloadavg()))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
