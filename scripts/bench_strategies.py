"""Benchmark the continual-learning strategies' overhead: step time against naive, Fisher speed, state memory.

What it measures, all in one process so that the ratios compare like with like:

1. Training-step time per strategy, as a ratio to naive. Every strategy gets the same initial weights, its own
   AdamW, and its state set up by its real ``after_task`` on task 0 (buffer filled, Fisher estimated, teacher
   copied; the time this takes is reported as ``setup_s``). Then optimizer steps on task 1 go through the
   real hooks in the training loop's order: ``before_task -> train_dataset -> train_batches`` (micro-batch)
   -> ``ctx.collate`` -> forward under ``ctx.autocast()`` -> ``causal_lm_loss`` -> ``strategy.loss`` ->
   backward -> ``after_backward`` -> clip -> ``optimizer.step`` -> ``after_step`` (one micro-batch per
   step). Steps of the strategies are interleaved (one step of each in turn), ``--warmup`` steps are
   dropped, the device is synchronised around each step, and the median of ``--steps`` is reported.
   Replay's steps carry more examples (its buffer share is added to each batch): ``ex/step`` shows it.
2. Fisher estimation: examples/s of ``fisher_diagonal_loop`` (one backward per example) against the batched
   ``fisher_diagonal`` (vmap of per-example gradients) on the same examples, and their max abs difference.
3. Memory of the strategies' state, from their ``accounting()``: EWC's Fisher + anchor, L2's anchor, LwF's
   teacher copy, replay's buffer.

Models: on CPU a tiny GPT-2 built from a config (2 layers, 64 wide, vocabulary 512), batch 8 x 64 tokens,
one CPU thread unless ``--threads``; on CUDA a GPT-2-small-shaped model from ``GPT2Config()`` (124M
parameters, random init, nothing downloaded) with bf16 autocast, batch 16 x 512 tokens. Examples are random
tokens; the second half of each is the target.

    python scripts/bench_strategies.py                       # CPU defaults: well under a minute
    python scripts/bench_strategies.py --device cuda --out bench.json
    python scripts/bench_strategies.py --strategies naive,ewc --steps 50 --batch-size 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.lm import causal_lm_loss, collate
from cl_runner.strategies import build_strategy, strategy_class
from cl_runner.strategies.base import Context, Strategy
from cl_runner.strategies.fisher import fisher_diagonal, fisher_diagonal_loop

ALL = ("naive", "replay", "ewc", "l2", "lwf", "ewc_replay")


def build_model(cuda: bool, seq_len: int) -> GPT2LMHeadModel:
    if cuda:
        config = GPT2Config(n_positions=max(1024, seq_len))
    else:
        config = GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=2,
            vocab_size=512,
            n_positions=max(64, seq_len),
            bos_token_id=0,
            eos_token_id=0,
        )
    return GPT2LMHeadModel(config)


def make_task(task: int, n: int, seq_len: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(1000 + task)
    ids = torch.randint(1, vocab, (n, seq_len), generator=g).tolist()
    half = seq_len // 2
    return [{"input_ids": row, "labels": [-100] * half + row[half:], "task_id": task} for row in ids]


def make_ctx(
    model: torch.nn.Module,
    device: torch.device,
    train_sets: list[list[dict]],
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Context:
    return Context(
        model=model,
        device=device,
        autocast=autocast,
        collate=functools.partial(collate, pad_id=0, device=device),
        task_names=[f"task{i}" for i in range(len(train_sets))],
        train_sets=train_sets,
        batch_size=batch_size,
        seed=0,
    )


def train_step(ctx: Context, strategy: Strategy, batches: Iterator[list[dict]]) -> int:
    """One optimizer step of one micro-batch, in the training loop's order; returns its example count."""
    micro = next(batches)
    batch = ctx.collate(micro)
    with ctx.autocast():
        outputs = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = causal_lm_loss(outputs.logits, batch["labels"])
    loss = strategy.loss(ctx, batch, outputs, loss)
    loss.backward()
    strategy.after_backward(ctx)
    torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), 1.0)
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    strategy.after_step(ctx)
    ctx.step += 1
    return len(micro)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def strategy_config(name: str, fisher_samples: int, fisher_batch_size: int):
    cfg = strategy_class(name).Config()
    if hasattr(cfg, "fisher_samples"):
        cfg.fisher_samples, cfg.fisher_batch_size = fisher_samples, fisher_batch_size
    return cfg


def bench_steps(args, device, autocast, init_state, train_sets) -> dict[str, dict]:
    runs = {}
    for name in args.strategies:
        model = build_model(device.type == "cuda", args.seq_len).to(device)
        model.load_state_dict(init_state)
        ctx = make_ctx(model, device, train_sets, args.batch_size, autocast)
        ctx.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        strategy = build_strategy(strategy_config(name, args.fisher_samples, args.fisher_batch_size))
        sync(device)
        start = time.perf_counter()
        strategy.before_task(ctx)
        strategy.after_task(ctx)  # task 0 "finished": sets up the buffer, Fisher, teacher
        sync(device)
        setup = time.perf_counter() - start
        ctx.task_index, ctx.step = 1, 0
        strategy.before_task(ctx)
        examples = strategy.train_dataset(ctx, train_sets[1])
        plain = (
            examples[i : i + args.batch_size]
            for i in itertools.cycle(range(0, len(examples), args.batch_size))
        )
        batches = iter(strategy.train_batches(ctx, plain))
        runs[name] = {
            "ctx": ctx,
            "strategy": strategy,
            "batches": batches,
            "times": [],
            "examples": [],
            "setup_s": setup,
        }
    for rep in range(args.warmup + args.steps):
        for run in runs.values():
            sync(device)
            start = time.perf_counter()
            n = train_step(run["ctx"], run["strategy"], run["batches"])
            sync(device)
            if rep >= args.warmup:
                run["times"].append(time.perf_counter() - start)
                run["examples"].append(n)
    base = statistics.median(runs["naive"]["times"]) if "naive" in runs else None
    results = {}
    for name, run in runs.items():
        median = statistics.median(run["times"])
        results[name] = {
            "median_ms": 1000 * median,
            "ratio_vs_naive": None if base is None else median / base,
            "examples_per_step": statistics.mean(run["examples"]),
            "setup_s": run["setup_s"],
            "accounting": run["strategy"].accounting(),
        }
    return results


def bench_fisher(args, device, autocast, init_state, train_sets) -> dict[str, float]:
    model = build_model(device.type == "cuda", args.seq_len).to(device)
    model.load_state_dict(init_state)
    ctx = make_ctx(model, device, train_sets, args.batch_size, autocast)
    examples = train_sets[0][: args.fisher_samples]
    fisher_diagonal(ctx, examples[:2], batch_size=2)  # one-time costs (kernels, functorch) out of the timing
    fisher_diagonal_loop(ctx, examples[:2])
    timings, values = {}, {}
    for label, fn in (
        ("loop", fisher_diagonal_loop),
        ("batched", functools.partial(fisher_diagonal, batch_size=args.fisher_batch_size)),
    ):
        sync(device)
        start = time.perf_counter()
        values[label] = fn(ctx, examples)
        sync(device)
        timings[label] = time.perf_counter() - start
    diff = max(float((values["loop"][n] - values["batched"][n]).abs().max()) for n in values["loop"])
    scale = max(float(f.abs().max()) for f in values["loop"].values())
    return {
        "examples": len(examples),
        "loop_examples_per_s": len(examples) / timings["loop"],
        "batched_examples_per_s": len(examples) / timings["batched"],
        "speedup": timings["loop"] / timings["batched"],
        "max_abs_diff": diff,
        "max_abs_fisher": scale,
    }


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def describe_state(accounting: dict) -> str:
    parts = []
    for key, value in accounting.items():
        if key.endswith("_bytes"):
            parts.append(f"{key.removesuffix('_bytes')} {mib(value)}")
        elif key in ("buffer_examples", "buffer_tokens"):
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per strategy (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per strategy first")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (CPU 8, CUDA 16)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example (CPU 64, CUDA 512)")
    parser.add_argument(
        "--strategies", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}"
    )
    parser.add_argument(
        "--fisher-samples", type=int, default=None, help="examples for the Fisher (CPU 32, CUDA 64)"
    )
    parser.add_argument("--fisher-batch-size", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (CPU default 1: the tiny model only pays for thread sync)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    args.batch_size = args.batch_size or (16 if cuda else 8)
    args.seq_len = args.seq_len or (512 if cuda else 64)
    args.fisher_samples = args.fisher_samples or (64 if cuda else 32)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(args.strategies) - set(ALL))
    if unknown:
        parser.error(f"--strategies: unknown {', '.join(unknown)}; expected names from {', '.join(ALL)}")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    torch.manual_seed(0)
    model = build_model(cuda, args.seq_len)
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    vocab, params = model.config.vocab_size, sum(p.numel() for p in model.parameters())
    n_examples = max(4 * args.batch_size, args.fisher_samples)
    train_sets = [make_task(t, n_examples, args.seq_len, vocab) for t in range(2)]
    del model

    print(
        f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), "
        f"GPT-2 {params / 1e6:.2f}M params, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{'bf16 autocast' if cuda else 'fp32'}"
    )
    steps = bench_steps(args, device, autocast, init_state, train_sets)
    print(f"\n{'strategy':<11} {'step ms':>9} {'vs naive':>9} {'ex/step':>8} {'setup s':>8}  state")
    for name, r in steps.items():
        ratio = "-" if r["ratio_vs_naive"] is None else f"{r['ratio_vs_naive']:.2f}x"
        print(
            f"{name:<11} {r['median_ms']:>9.2f} {ratio:>9} {r['examples_per_step']:>8.1f} "
            f"{r['setup_s']:>8.2f}  {describe_state(r['accounting'])}"
        )
    fisher = bench_fisher(args, device, autocast, init_state, train_sets)
    print(
        f"\nFisher on {fisher['examples']} examples: loop {fisher['loop_examples_per_s']:.1f} ex/s, batched "
        f"{fisher['batched_examples_per_s']:.1f} ex/s (x{fisher['speedup']:.2f}, fisher_batch_size "
        f"{args.fisher_batch_size}); max |loop - batched| {fisher['max_abs_diff']:.3g} "
        f"(max |F| {fisher['max_abs_fisher']:.3g})"
    )
    if args.out:
        report = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "parameters": params,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "precision": "bf16" if cuda else "fp32",
            "strategies": steps,
            "fisher": {**fisher, "fisher_batch_size": args.fisher_batch_size},
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
