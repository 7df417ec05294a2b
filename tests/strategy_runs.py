"""Every shipped strategy on three small fact tasks without dropout: the runs that compare two ways of computing a
step that must learn the same thing (train.grad_accum in tests/engine/test_grad_accum.py, train.pack in
tests/models/test_packing.py). Dropout is off because its masks are drawn per micro-batch or per packed row."""

from __future__ import annotations

from helpers import REPO, make_config

from cl_runner.config.schema import Config

STRATEGIES = sorted(p.stem for p in (REPO / "conf" / "strategy").glob("*.yaml"))  # the shipped ones
NO_DROPOUT = [f"+model.arch.{name}=0.0" for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
TASKS = [{"name": n, "source": "facts", "relation": n, "num_subjects": 12, "metric": "exact_match"}
         for n in ("color", "city", "food")]
# batch 8 of 12 examples: each epoch ends with a shorter step batch (4 examples), which 4 micro-batches cut to 1s;
# 2 epochs a task: the second starts from AdamW's state of the first (what a resumed or accumulated step must carry)
EPOCHS = 2
SMALL = [f"train.epochs={EPOCHS}", "train.batch_size=8", "train.keep_best=false", "checkpoint.enabled=false",
         "strategy.buffer_size=8"]
OPTIONS = {"mer": ["strategy.inner_steps=2", "strategy.beta=0.5"], "lamol": ["strategy.gen_batch_size=16"]}
BUFFERED = ("replay", "mer", "ewc_replay")  # the strategies with a strategy.buffer_size option set by SMALL


def small_run(strategy: str, *overrides: str) -> Config:
    """``strategy`` on TASKS with SMALL (its buffer option only where it has one), OPTIONS and NO_DROPOUT."""
    options = [o for o in SMALL if not o.startswith("strategy.") or strategy in BUFFERED]
    return make_config(f"strategy={strategy}", *options, *OPTIONS.get(strategy, []), *overrides, *NO_DROPOUT,
                       tasks=TASKS)
