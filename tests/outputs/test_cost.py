"""The cost block of metrics.json (cl_runner/outputs/cost.py): its numbers from what the run records (parameters, epoch
records, evaluation seconds) and the peaks in bytes; end to end, the tokens seen equal the training data's tokens
times the epochs, and the same numbers reach the console table, cl-report's table and the trackers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from helpers import make_config, run_quietly
from rich.console import Console
from transformers import AutoTokenizer

from cl_runner import report_cli
from cl_runner.models.lm import token_counts
from cl_runner.outputs import cost, report
from cl_runner.outputs.results import print_summary
from cl_runner.tasks import encode_task, load_sequence


def test_the_cost_block_sums_the_runs_records_and_keeps_the_earlier_peak():
    info = {"parameters": {"total": 1000, "trainable_per_task": {"a": 1000, "b": 40}},
            "eval_seconds_per_stage": {"init": {"eval": 0.5, "validation": 0.0},
                                       "after_a": {"eval": 0.25, "validation": 1.0}},
            "cost": {"peak_cpu_rss_bytes": 1 << 50, "peak_cuda_allocated_bytes": None}}  # an earlier life's peak
    history = [{"seconds": 2.0, "tokens": 300, "target_tokens": 40, "tokens_per_s": 150.0},
               {"seconds": 1.5, "tokens_per_s": 200.0, "target_tokens_per_s": 20.0}]  # recorded before `tokens`
    block = cost.run_cost(info, history, 1064, torch.device("cpu"))
    assert block == {"trainable_parameters": 1000, "extra_parameters": 64, "peak_cpu_rss_bytes": 1 << 50,
                     "peak_cuda_allocated_bytes": None, "train_seconds": 3.5, "eval_seconds": 0.75,
                     "validation_seconds": 1.0, "tokens_seen": 600, "target_tokens_seen": 70}
    assert cost.run_cost({**info, "cost": {}}, [], 1000, torch.device("cpu"))["peak_cpu_rss_bytes"] < 1 << 50


def test_the_cuda_peak_is_torchs_max_allocated_and_the_larger_of_two_lives(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5_000)
    cuda = torch.device("cuda", 0)
    assert cost.peaks(cuda, {})["peak_cuda_allocated_bytes"] == 5_000
    assert cost.peaks(cuda, {"peak_cuda_allocated_bytes": 7_000})["peak_cuda_allocated_bytes"] == 7_000


def test_peak_rss_is_in_bytes():
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux /proc")
    high_water = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
    # VmHWM is in kB (KiB), ru_maxrss too on Linux; the two are kept apart by the kernel and may differ a little
    assert cost.peak_rss_bytes() == pytest.approx(high_water * 1024, rel=0.05)


def test_cost_rows_format_each_kind_and_leave_out_what_is_unknown():
    rows = dict(cost.cost_rows({"trainable_parameters": 529280, "peak_cpu_rss_bytes": 459206656,
                                "peak_cuda_allocated_bytes": None, "train_seconds": 2.97, "tokens_seen": 5120}))
    assert rows == {"trainable parameters": "529.3k", "peak memory (CPU RSS)": "459.2 MB",
                    "training time (s)": "3.0", "tokens trained on": "5.1k"}


@pytest.mark.slow
def test_a_runs_cost_counts_its_data_and_reaches_every_table_and_the_trackers(tmp_path, capsys, monkeypatch):
    cfg = make_config("train.epochs=1", "logger=csv")
    run_dir = tmp_path / "run"
    metrics = run_quietly(cfg, run_dir)
    block = metrics["cost"]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    counts = [token_counts(encode_task(t, i, tokenizer, cfg.train.max_length).train)
              for i, t in enumerate(load_sequence(cfg.tasks, cfg.seed))]
    assert block["tokens_seen"] == sum(c[0] for c in counts) > 0  # every example once (one epoch)
    assert block["target_tokens_seen"] == sum(c[1] for c in counts) > 0
    assert block["trainable_parameters"] == metrics["parameters"]["total"] and block["extra_parameters"] == 0
    assert block["peak_cpu_rss_bytes"] > 50e6 and block["peak_cuda_allocated_bytes"] is None
    assert block["train_seconds"] > 0 and block["eval_seconds"] > 0
    assert json.loads((run_dir / "metrics.json").read_text())["cost"] == block

    with (run_dir / "logged_metrics.csv").open(newline="") as handle:
        logged = {row["name"].removeprefix("summary/cost/"): float(row["value"]) for row in csv.DictReader(handle)
                  if row["name"].startswith("summary/cost/")}
    assert logged == {k: v for k, v in block.items() if v is not None}

    out = io.StringIO()
    print_summary(Console(file=out, width=100), metrics["tasks"], [[0.0] * 3] * 4, metrics,
                  metrics["metric_per_task"], run_dir)
    line = next(line for line in out.getvalue().splitlines() if "tokens trained on" in line)
    assert f" {cost.compact(block['tokens_seen'])} " in line
    monkeypatch.setattr(report, "Console", lambda: Console(width=250))
    report_cli.main([str(run_dir), "--out", str(tmp_path / "report"), "--no-plots"])
    printed = capsys.readouterr().out
    assert "train (s)" in printed and "peak RSS" in printed and "peak CUDA" not in printed
    with (tmp_path / "report" / "report.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["cost.tokens_seen_mean"]) == block["tokens_seen"]
