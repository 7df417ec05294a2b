"""A CUDA out-of-memory during a run: metrics.json says ``failed`` with one line naming the options that lower
the memory (the training batch's, evaluation's and the strategy's own), and cl-run prints that line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_config, run_quietly

from cl_runner.engine.run import out_of_memory_line
from cl_runner.strategies.ewc import EWC

OOM = getattr(torch, "OutOfMemoryError", None)


def test_the_line_names_the_strategys_memory_options():
    line = out_of_memory_line(make_config("strategy=ewc"), RuntimeError("CUDA out of memory. Tried 2 GiB\nmore"))
    assert "\n" not in line and "strategy.fisher_batch_size" in line and "train.grad_accum" in line
    assert "train.eval_batch_size" in line and "Tried 2 GiB" in line
    assert "strategy." not in out_of_memory_line(make_config(), RuntimeError("x")).split("lower ")[1]  # naive


@pytest.mark.slow
@pytest.mark.skipif(OOM is None, reason="torch without OutOfMemoryError")
def test_an_out_of_memory_in_a_strategys_pass_ends_the_run_failed_with_that_line(tmp_path, monkeypatch):
    def estimate(self, ctx):
        raise OOM("CUDA out of memory. Tried to allocate 8.60 GiB")

    monkeypatch.setattr(EWC, "estimate_fisher", estimate)
    cfg = make_config("strategy=ewc", "train.epochs=1", "train.keep_best=false", "eval.max_examples=8")
    with pytest.raises(OOM):
        run_quietly(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("CUDA out of memory running ewc")
    assert "strategy.fisher_batch_size" in metrics["error"]
