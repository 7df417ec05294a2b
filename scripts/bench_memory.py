"""The memory plan (cl_runner/engine/memory_plan.py) against the measured peak host memory of training on CPU, and
the peak with and without train.activation_checkpointing.

Each case runs in its own process: the config composed as cl-run composes it (overrides below), the model built
from it, then a few optimizer steps of the real loop (engine/loop.py: the strategy's hooks, AdamW) on examples of
exactly ``train.max_length`` tokens, the batch the plan assumes. Measured: the rise of the process's peak resident
memory (Linux's VmHWM, reset first through /proc/self/clear_refs) from just before the model is built, against
the plan's total. Linux only. Under glibc's default malloc the heap keeps freed activations it cannot return
(fragmentation: up to 2x the live peak with activation checkpointing); ``--mmap-threshold 65536`` measures the
peak of live memory, what the plan estimates.

    python scripts/bench_memory.py                       # model=tiny and a GPT-2-small-sized config, naive + ewc
    python scripts/bench_memory.py --cases tiny --steps 2  # one small case (a check that the script works)
    python scripts/bench_memory.py --ac-length 1024      # activation checkpointing off/on at 1024 tokens
    python scripts/bench_memory.py --mmap-threshold 65536  # peak RSS without glibc's heap fragmentation
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

GPT2_SMALL = ["model.arch.n_layer=12", "model.arch.n_embd=768", "model.arch.n_head=12", "model.arch.n_positions=1024",
              "model.tokenizer_vocab_size=50257"]
CASES = {
    "tiny": [],
    "tiny_ewc": ["strategy=ewc"],
    "gpt2_small": [*GPT2_SMALL, "train.batch_size=2", "train.max_length=256"],
}


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(overrides: list[str], steps: int) -> dict:
    """In this process: the plan of the composed config, and the measured peak rise of training it."""
    from contextlib import nullcontext
    from functools import partial

    import torch
    from hydra import compose, initialize_config_dir
    from transformers import AutoConfig

    from cl_runner.cli import CONF_DIR
    from cl_runner.config.validate import register_configs, validate
    from cl_runner.engine import memory_plan
    from cl_runner.engine.loop import TaskRun, train_task
    from cl_runner.models.kinds import kind_of
    from cl_runner.models.lm import collate
    from cl_runner.models.load import DTYPES, auto_class
    from cl_runner.strategies import Context, build_strategy

    torch.set_num_threads(1)
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose("config", overrides=["device=cpu", "train.keep_best=false", *overrides]))
    plan = memory_plan.plan(cfg, world_size=1)
    arch = dict(cfg.model.arch)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=cfg.model.tokenizer_vocab_size, **arch)
    length, vocab = cfg.train.max_length, cfg.model.tokenizer_vocab_size
    g = torch.Generator().manual_seed(0)
    tasks = [[{"input_ids": (ids := torch.randint(1, vocab, (length,), generator=g).tolist()),
               "labels": [-100] * (length // 2) + ids[length // 2:], "task_id": t}
              for _ in range(2 * cfg.train.batch_size)] for t in range(2)]

    def train(model: torch.nn.Module, steps: int) -> None:
        ctx = Context(model=model, device=torch.device("cpu"), autocast=nullcontext,
                      collate=partial(collate, pad_id=0), task_names=["a", "b"], train_sets=tasks,
                      batch_size=cfg.train.batch_size, kind=kind_of(model))
        strategy = build_strategy(cfg.strategy)
        cfg.train.max_steps = steps
        for t in range(2):  # two tasks: the strategy's state of the first exists while the second trains
            ctx.task_index = t
            train_task(TaskRun(ctx, strategy, tasks[t], cfg.train, validate=lambda tasks: 0.0))

    # a warm-up on a one-layer copy of the config: the code the first steps import lazily is not the model's memory
    small = copy.deepcopy(config)
    small.n_layer, small.n_embd, small.n_head = 1, 64, 2
    train(auto_class(small).from_config(small), 1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _rss("VmRSS")
    torch.manual_seed(0)
    model = auto_class(config).from_config(config, dtype=DTYPES[cfg.model.dtype])
    if cfg.train.activation_checkpointing:
        from cl_runner.engine.activations import enable

        enable(model)
    train(model, steps)
    peak = _rss("VmHWM") - before
    return {"overrides": overrides, "planned": plan.total, "planned_rows": plan.rows, "measured": peak,
            "ratio": round(peak / plan.total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per task")
    parser.add_argument("--ac-length", type=int, default=0,
                        help="also measure activation checkpointing off/on at this sequence length (model=tiny "
                             "with as many positions)")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="run the cases with glibc's MALLOC_MMAP_THRESHOLD_ at this many bytes (e.g. 65536: "
                             "large tensors go back to the system when freed, so peak RSS follows live memory "
                             "instead of the heap's fragmentation); 0: glibc's default")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a case's overrides, JSON: run in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one), args.steps)))
        return
    runs = {name: CASES[name] for name in args.cases}
    if args.ac_length:
        long = [f"model.arch.n_positions={args.ac_length}", f"train.max_length={args.ac_length}",
                "train.batch_size=4", "model.arch.n_layer=8"]
        runs |= {f"ac_off_{args.ac_length}": long, f"ac_on_{args.ac_length}": [*long,
                                                                            "train.activation_checkpointing=true"]}
    results = {}
    for name, overrides in runs.items():
        env = os.environ | ({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {})
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(overrides), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True, env=env)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:16s} planned {r['planned'] / 2**20:8.1f} MiB  measured {r['measured'] / 2**20:8.1f} MiB  "
              f"measured/planned {r['ratio']}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
