"""Benchmark cl-runner's training step against a plain PyTorch loop, the same loop compiled, and HF Trainer.

Four contenders train the same model (same initial weights) on the same random-token data with the same batch,
learning rate and clipping, each with its own copy of the model and its own optimizer:

- ``cl_runner``: the real loop, ``cl_runner.engine.loop.train_task`` with the naive strategy and a Context built as
  ``cl_runner.engine.assembly.build_parts`` builds it (validation off: ``train.keep_best=false``).
- ``plain``: forward, token-mean cross-entropy, backward, ``clip_grad_norm_``, ``AdamW(fused=True)`` step,
  on batches already on the device (the best case for data loading).
- ``compiled``: the same loop with forward + loss under ``torch.compile`` (compilation is in the warm-up).
- ``hf_trainer``: ``transformers.Trainer`` with its defaults but no evaluation, no saving, no logging, and the
  same batch, learning rate and clipping (bf16 on CUDA).

The contenders take turns: after a warm-up round (setup, compilation, first steps; peak memory is measured
there), ``--rounds`` rounds give each contender ``--block`` optimizer steps in turn, timed between device
syncs; the median over rounds is reported. ``train_task`` and ``Trainer.train`` run in threads that wait at
every optimizer step for their next turn, so each runs one uninterrupted task. Reported per contender:
tokens/s, the ratio to ``plain``, MFU (6 x parameters x tokens/s / the device's peak bf16 FLOP/s, from
``cl_runner.engine.flops``; None on CPU and on GPUs missing from its table), and peak memory (CUDA:
``max_memory_allocated`` above what was allocated before the contender was built; CPU: growth of the process's
peak RSS over the same span, compilation included).

Sizes (models built from a config, nothing downloaded): CPU ``tiny`` (conf/model/tiny.yaml) and ``5m`` (a ~5M
GPT-2), fp32, batch 8 x 64 and 8 x 128; CUDA ``gpt2`` and ``gpt2-medium``, batch 16 x 512, bf16 autocast.
torch's thread count is left as users get it (``--threads`` to set it) and printed.

    python scripts/bench_loop.py                          # by device: CPU tiny + 5m, CUDA gpt2 + gpt2-medium
    python scripts/bench_loop.py --sizes 5m --rounds 7 --out bench_loop.json
    python scripts/bench_loop.py --contenders cl_runner,plain --block 5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cl_runner.config.schema import Config
from cl_runner.engine.flops import flops_per_token, mfu, peak_flops
from cl_runner.engine.runtime import autocast_factory, resolve_device
from cl_runner.models.lm import collate
from cl_runner.strategies import Context

CONTENDERS = ("cl_runner", "plain", "compiled", "hf_trainer")
SIZES = {  # arch None: conf/model/tiny.yaml's
    "tiny": {"arch": None, "vocab": 1024, "batch": 8, "seq_len": 64},
    "5m": {"arch": {"n_layer": 6, "n_embd": 256, "n_head": 8}, "vocab": 1024, "batch": 8, "seq_len": 128},
    "gpt2": {"arch": {"n_layer": 12, "n_embd": 768, "n_head": 12}, "vocab": 50257, "batch": 16, "seq_len": 512},
    "gpt2-medium": {"arch": {"n_layer": 24, "n_embd": 1024, "n_head": 16}, "vocab": 50257, "batch": 16,
                    "seq_len": 512},
}
DEFAULT_SIZES = {"cpu": ("tiny", "5m"), "cuda": ("gpt2", "gpt2-medium")}


# ---------------------------------------------------------------- set-up shared with bench_strategies.py


def compose_config(*overrides: str) -> Config:
    """The real composed and validated config (conf/), as ``cl-run`` would build it."""
    from hydra import compose, initialize_config_dir

    from cl_runner.cli import CONF_DIR
    from cl_runner.config.validate import register_configs, validate

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def build_model(size: str, cfg: Config) -> torch.nn.Module:
    """A randomly initialised causal LM of ``size`` (seeded by ``cfg.seed``), built from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = SIZES[size]
    arch = dict(spec["arch"] or cfg.model.arch)
    model_type = arch.pop("model_type", "gpt2")
    arch["n_positions"] = max(arch.get("n_positions", 0), spec["seq_len"])
    config = AutoConfig.for_model(model_type, vocab_size=spec["vocab"], bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0, **arch)
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_context(cfg: Config, model: torch.nn.Module, train_sets: list[list[dict]]) -> Context:
    """The Context ``cl_runner.engine.assembly.build_parts`` builds, for a model and encoded tasks given here."""
    device, precision = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.device.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return Context(model=model.to(device), device=device, autocast=autocast_factory(device, precision),
                   collate=functools.partial(collate, pad_id=0, device=device),
                   task_names=[f"task{i}" for i in range(len(train_sets))], train_sets=train_sets,
                   batch_size=cfg.train.batch_size, seed=cfg.seed, eos_id=0)


def random_rows(task: int, n: int, seq_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 + task)
    return torch.randint(1, vocab, (n, seq_len), generator=g).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak memory above a starting point: CUDA allocations, or the process's RSS (peak reset where Linux
    allows it, else the lifetime peak)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.base = _proc_status_kib("VmRSS") * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = _proc_status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak * 1024 - self.base)


def _proc_status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Stop(Exception):
    """Raised inside a relayed training function to end it after its last timed block."""


class Relay:
    """Runs ``target(on_step)`` in a thread that pauses at every optimizer step's ``on_step`` until it is given
    its next block of steps, so a whole ``train_task`` (or ``Trainer.train``) can take turns with others."""

    def __init__(self, target: Callable[[Callable[[], None]], None]) -> None:
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.remaining, self.stopping, self.finished, self.error = 0, False, False, None
        self.thread = threading.Thread(target=self._main, args=(target,), daemon=True)

    def _main(self, target: Callable[[Callable[[], None]], None]) -> None:
        self.go.acquire()
        try:
            target(self.on_step)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: B036 - handed to the main thread
            self.error = exc
        self.finished = True
        self.done.release()

    def on_step(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.done.release()
            self.go.acquire()
            if self.stopping:
                raise _Stop

    def run(self, steps: int) -> None:
        """Let the thread take ``steps`` optimizer steps; returns when it is paused again."""
        if not self.thread.is_alive() and not self.finished:
            self.thread.start()
        self.remaining = steps
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise self.error
        if self.finished:
            raise RuntimeError("the training function ended before its last block")

    def close(self) -> None:
        if self.thread.is_alive():
            self.stopping = True
            self.go.release()
            self.thread.join()


def step_callbacks(on_step: Callable[[], None]):
    """``LoopCallbacks`` that report each optimizer step of ``train_task`` to a Relay."""
    from cl_runner.engine.loop import LoopCallbacks

    class _Steps(LoopCallbacks):
        def on_boundary(self, boundary) -> None:
            if boundary.kind == "step":
                on_step()

    return _Steps()


def train_task_target(ctx: Context, strategy, examples: list[dict], cfg: Config, steps: int):
    """The relayed function of ``train_task`` on ``examples`` for ``steps`` optimizer steps (no validation)."""
    from cl_runner.engine.loop import TaskRun, train_task

    train = dataclasses.replace(cfg.train, max_steps=steps, keep_best=False)

    def target(on_step: Callable[[], None]) -> None:
        train_task(TaskRun(ctx=ctx, strategy=strategy, examples=examples, cfg=train, validate=lambda tasks: 0.0,
                           callbacks=step_callbacks(on_step)))

    return target


def timed_block(device: torch.device, run: Callable[[int], None], steps: int) -> float:
    """Seconds per optimizer step over ``steps`` steps, between device syncs."""
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    return (time.perf_counter() - start) / steps


def progress(text: str) -> None:
    print(f"  {text} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------- the contenders


class Plain:
    """Forward, token-mean cross-entropy, backward, clip, fused AdamW; batches already on the device."""

    def __init__(self, model: torch.nn.Module, rows: torch.Tensor, cfg: Config, compiled: bool = False) -> None:
        device, precision = resolve_device(cfg.device)
        self.model, self.autocast = model.to(device).train(), autocast_factory(device, precision)
        self.rows, self.batch, self.at = rows.to(device), cfg.train.batch_size, 0
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, fused=True)
        self.loss = torch.compile(self._loss) if compiled else self._loss

    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if self.at + self.batch > len(self.rows):
                self.at = 0
            ids = self.rows[self.at : self.at + self.batch]
            self.at += self.batch
            self.loss(ids).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


def hf_trainer(model: torch.nn.Module, rows: torch.Tensor, cfg: Config, steps: int) -> Relay:
    """``transformers.Trainer`` on the same data, relayed step by step."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    device, precision = resolve_device(cfg.device)
    data = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in rows]
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_loop_hf_"), per_device_train_batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.lr, max_grad_norm=1.0, max_steps=steps, eval_strategy="no", save_strategy="no",
        logging_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed, use_cpu=device.type == "cpu",
        bf16=precision == "bf16", fp16=precision == "fp16",
    )

    def target(on_step: Callable[[], None]) -> None:
        class Steps(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                on_step()

        try:
            Trainer(model=model, args=args, train_dataset=data, callbacks=[Steps()]).train()
        finally:
            shutil.rmtree(args.output_dir, ignore_errors=True)

    return Relay(target)


def build_contender(name: str, model: torch.nn.Module, rows: list[list[int]], cfg: Config, steps: int):
    """A contender with ``run(steps)`` and ``close()`` on its own copy of ``model``."""
    from cl_runner.strategies import build_strategy

    model = copy.deepcopy(model)
    if name == "cl_runner":
        examples = [{"input_ids": r, "labels": r, "task_id": 0} for r in rows]
        ctx = make_context(cfg, model, [examples])
        return Relay(train_task_target(ctx, build_strategy(cfg.strategy), examples, cfg, steps))
    tensor = torch.tensor(rows, dtype=torch.long)
    if name == "hf_trainer":
        return hf_trainer(model, tensor, cfg, steps)
    return Plain(model, tensor, cfg, compiled=name == "compiled")


# ---------------------------------------------------------------- the benchmark


def bench_size(size: str, args: argparse.Namespace) -> dict:
    spec = SIZES[size]
    batch, seq_len = args.batch_size or spec["batch"], args.seq_len or spec["seq_len"]
    cfg = compose_config(f"device={args.device}", "strategy=naive", f"train.batch_size={batch}")
    device, precision = resolve_device(cfg.device)
    model = build_model(size, cfg)
    steps = args.warmup + args.rounds * args.block
    rows = random_rows(0, batch * steps, seq_len, spec["vocab"])
    params, flops, tokens = parameter_count(model), flops_per_token(model), batch * seq_len
    peak = peak_flops(device)
    contenders, results, times = {}, {}, {}
    meter = MemoryMeter(device)
    for name in args.contenders:  # warm-up round: build, compile, first steps; peak memory
        progress(f"{size}: warming up {name}")
        meter.start()
        started = time.perf_counter()
        try:
            contenders[name] = build_contender(name, model, rows, cfg, steps)
            timed_block(device, contenders[name].run, args.warmup)
        except Exception as exc:  # one broken contender (no compiler, no accelerate) must not end the run
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
            contenders.pop(name, None)
            continue
        results[name] = {"peak_memory_mib": meter.peak_bytes() / 2**20, "warmup_s": time.perf_counter() - started}
        times[name] = []
    for round_ in range(args.rounds):
        progress(f"{size}: round {round_ + 1}/{args.rounds}")
        for name, contender in contenders.items():
            times[name].append(timed_block(device, contender.run, args.block))
    for contender in contenders.values():
        contender.close()
    for name, step_times in times.items():
        median = statistics.median(step_times)
        results[name].update(step_ms=1000 * median, tokens_per_s=tokens / median,
                             mfu=mfu(flops, tokens / median, peak),
                             step_ms_spread=[1000 * min(step_times), 1000 * max(step_times)])
    base = results.get("plain", {}).get("tokens_per_s")
    for r in results.values():
        if "tokens_per_s" in r:
            r["vs_plain"] = None if base is None else r["tokens_per_s"] / base
    return {"parameters": params, "batch_size": batch, "seq_len": seq_len, "precision": precision,
            "contenders": results, "cl_runner_vs": ratios_of(results, "cl_runner")}


def ratios_of(results: dict[str, dict], name: str) -> dict[str, float]:
    """Tokens/s of ``name`` over each other contender's (the issue's targets: vs compiled, vs hf_trainer)."""
    mine = results.get(name, {}).get("tokens_per_s")
    return {other: mine / r["tokens_per_s"] for other, r in results.items()
            if mine and other != name and "tokens_per_s" in r}


def print_size(size: str, report: dict) -> None:
    print(f"\n{size}: {report['parameters'] / 1e6:.2f}M parameters, batch {report['batch_size']} x "
          f"{report['seq_len']} tokens, {report['precision']}")
    print(f"{'contender':<11} {'tokens/s':>11} {'vs plain':>9} {'step ms':>9} {'min-max ms':>15} {'MFU':>6} "
          f"{'peak MiB':>9} {'warm-up s':>9}")
    for name, r in report["contenders"].items():
        if "error" in r:
            print(f"{name:<11} error: {r['error']}")
            continue
        ratio = "-" if r["vs_plain"] is None else f"{r['vs_plain']:.2f}x"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        spread = "{:.2f}-{:.2f}".format(*r["step_ms_spread"])
        print(f"{name:<11} {r['tokens_per_s']:>11,.0f} {ratio:>9} {r['step_ms']:>9.2f} {spread:>15} {mfu:>6} "
              f"{r['peak_memory_mib']:>9.1f} {r['warmup_s']:>9.1f}")
    if report["cl_runner_vs"]:
        print("cl_runner's tokens/s over " + ", ".join(f"{k}'s: {v:.2f}x" for k, v in report["cl_runner_vs"].items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated subset of {','.join(SIZES)} (default: tiny,5m on CPU, "
                             "gpt2,gpt2-medium on CUDA)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--block", type=int, default=10, help="optimizer steps per contender per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default per size)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per example (default per size)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.contenders = _names(parser, "--contenders", args.contenders, CONTENDERS)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.sizes = _names(parser, "--sizes", args.sizes, SIZES) if args.sizes else list(DEFAULT_SIZES[args.device])
    if min(args.rounds, args.block, args.warmup) < 1:
        parser.error("--rounds, --block, --warmup: expected positive integers")
    return args


def _names(parser: argparse.ArgumentParser, flag: str, text: str, known) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        parser.error(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; expected names from {', '.join(known)}")
    return names


def environment(device: torch.device) -> dict:
    import transformers

    return {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
            "torch": str(torch.__version__), "transformers": transformers.__version__,
            "peak_flops": peak_flops(device), "loadavg_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = environment(torch.device(args.device))
    print(f"device {report['device']} ({report['device_name']}), {report['threads']} torch threads, "
          f"torch {report['torch']}, transformers {report['transformers']}; {load_line()}")
    print(f"{args.warmup} warm-up steps, then {args.rounds} interleaved rounds of {args.block} steps each")
    report["sizes"] = {}
    for size in args.sizes:
        report["sizes"][size] = bench_size(size, args)
        print_size(size, report["sizes"][size])
    report["loadavg_end"] = list(os.getloadavg())
    print(f"\n{load_line()}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
