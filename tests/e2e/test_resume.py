"""Nothing lost: SIGKILL at seeded random moments + resume reproduces an uninterrupted run exactly (CPU);
SIGINT/SIGTERM checkpoint and exit 130/143; a damaged newest checkpoint falls back to the previous one; a
re-run sweep skips finished jobs and completes the killed one; finished runs and bad resumes answer clearly; a
resume reads state.pt once."""

from __future__ import annotations

import io
import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cl_run, make_config, run_quietly
from resume_runs import FAST, kill_and_resume, outcome, reference, start, wait_for
from rich.console import Console
from strategy_runs import STRATEGIES

from cl_runner.engine import checkpoint as checkpoint_module
from cl_runner.engine.run import run


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_identical(tmp_path):
    expected = reference(tmp_path)
    rng = random.Random(0)  # seeded moments: inside tasks, at task boundaries, during evaluation
    moments = sorted((rng.randint(1, 11), rng.uniform(0.0, 0.3)) for _ in range(3))
    assert kill_and_resume(tmp_path / "killed", moments) >= 2
    assert outcome(tmp_path / "killed") == expected


@pytest.mark.slow
class TestEveryStrategy:  # its own --dist loadscope unit: these ~20 runs may go to another worker than the rest
    @pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "naive"])
    def test_resumes_identically(self, tmp_path, strategy):
        args = (f"strategy={strategy}", "train.epochs=2")
        expected = reference(tmp_path, *args)
        rng = random.Random(strategy)
        assert kill_and_resume(tmp_path / "killed", [(rng.randint(1, 5), rng.uniform(0.0, 0.2))], *args) == 1
        assert outcome(tmp_path / "killed") == expected


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_checkpoint_and_exit_with_their_status(tmp_path, signum, code):
    expected = reference(tmp_path, "train.epochs=2")
    run_dir = tmp_path / "stopped"
    proc = start(run_dir, "train.epochs=2")
    wait_for(lambda: (run_dir / "history.jsonl").exists())
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == code
    err = proc.stderr.read()
    assert f"Resume with: cl-run resume={run_dir}" in err and "Traceback" not in err
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    assert cl_run(f"resume={run_dir}", cwd=tmp_path).returncode == 0
    assert outcome(run_dir) == expected


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    expected = reference(tmp_path, "train.epochs=2")
    run_dir = tmp_path / "damaged"
    proc = start(run_dir, "train.epochs=2")
    wait_for(lambda: len(list((run_dir / "checkpoints").glob("ckpt-*"))) >= 2 if (run_dir / "checkpoints").exists()
             else False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]
    with open(newest / "model.safetensors", "r+b") as handle:  # flip bytes in the middle of the weights
        handle.seek(2000)
        handle.write(b"\x00\xff" * 64)
    proc = cl_run(f"resume={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "damaged" in proc.stdout + proc.stderr
    assert outcome(run_dir) == expected


@pytest.mark.slow
def test_resume_answers(tmp_path):
    run_dir = tmp_path / "done"
    assert start(run_dir, "train.epochs=1").wait(timeout=120) == 0
    before = (run_dir / "metrics.json").read_text()
    finished = cl_run(f"resume={run_dir}", cwd=tmp_path)
    assert finished.returncode == 0 and "already finished" in finished.stdout
    assert (run_dir / "metrics.json").read_text() == before
    not_a_run = cl_run(f"resume={tmp_path}", cwd=tmp_path)
    assert not_a_run.returncode == 2 and "is not a cl-run run directory" in not_a_run.stderr
    changed = cl_run(f"resume={run_dir}", "train.lr=1", cwd=tmp_path)
    assert changed.returncode == 2 and "resume: train.lr cannot change on resume" in changed.stderr


@pytest.mark.slow
def test_killed_before_first_checkpoint_restarts_from_the_beginning(tmp_path):
    expected = reference(tmp_path, "train.epochs=1")
    run_dir = tmp_path / "early"
    proc = start(run_dir, "train.epochs=1")
    wait_for(lambda: (run_dir / "config.yaml").exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for ckpt in (run_dir / "checkpoints").glob("*") if (run_dir / "checkpoints").exists() else []:
        import shutil

        shutil.rmtree(ckpt)
    assert cl_run(f"resume={run_dir}", cwd=tmp_path).returncode == 0
    assert outcome(run_dir) == expected


@pytest.mark.slow
def test_second_run_on_the_same_directory_is_refused(tmp_path):
    run_dir = tmp_path / "busy"
    first = start(run_dir, "train.epochs=200")  # long enough to still be running when the second one starts
    wait_for(lambda: (run_dir / "history.jsonl").exists())
    second = cl_run(f"hydra.run.dir={run_dir}", *FAST, "train.epochs=200", cwd=tmp_path)
    still_running = first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert still_running
    assert second.returncode == 2 and "is in use by another cl-run" in second.stderr


@pytest.mark.slow
def test_rerun_sweep_skips_finished_jobs_and_completes_the_killed_one(tmp_path):
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "cl_runner", "-m", f"hydra.sweep.dir={sweep}", "train.lr=1e-3,3e-3",
            "device=cpu", "train.epochs=3", "checkpoint.every_n_steps=5"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second_job = lambda: [p for p in sweep.glob("1*") if (p / "history.jsonl").exists()]  # noqa: E731
    wait_for(lambda: bool(second_job()) or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (first,) = [p for p in sweep.iterdir() if p.name.startswith("0")]
    stamp = {f.name: f.stat().st_mtime_ns for f in first.iterdir() if f.is_file()}
    assert subprocess.run(args, cwd=tmp_path, capture_output=True).returncode == 0
    assert {f.name: f.stat().st_mtime_ns for f in first.iterdir() if f.is_file()} == stamp
    for job in (p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()):
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_resume_in_process_reads_state_once_and_matches(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = make_config("train.epochs=1", "checkpoint.every_n_steps=3", "checkpoint.keep_last=100")
    expected = run_quietly(cfg, run_dir)
    expected_history = stable_history(run_dir)
    weights = (run_dir / "model" / "model.safetensors").read_bytes()  # save.final_model
    shutil.rmtree(run_dir / "model")
    checkpoints = checkpoint_module.list_checkpoints(run_dir)
    inside_task = [p for p in checkpoints if torch.load(p / "state.pt", weights_only=True)["task"] is not None]
    for newer in checkpoints[checkpoints.index(inside_task[len(inside_task) // 2]) + 1 :]:
        for f in newer.iterdir():
            f.unlink()
        newer.rmdir()
    loads = []
    real_load = torch.load
    monkeypatch.setattr(checkpoint_module.torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    resumed = run(cfg, run_dir, console=Console(file=io.StringIO()), resume=True)
    assert [Path(p).name for p in loads if Path(p).name == "state.pt"] == ["state.pt"]
    assert [s["scores"] for s in resumed["stages"]] == [s["scores"] for s in expected["stages"]]
    assert stable_history(run_dir) == expected_history
    assert (run_dir / "model" / "model.safetensors").read_bytes() == weights  # the resumed run saves the same model


def stable_history(run_dir: Path) -> list[dict]:
    """history.jsonl without its timings."""
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    timings = ("seconds", "tokens_per_s", "target_tokens_per_s", "validation_seconds")
    return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in lines]
