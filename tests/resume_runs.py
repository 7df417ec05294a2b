"""Kill and resume cl-run: start a run in a subprocess, SIGKILL it at given moments and resume it until it finishes,
and the uninterrupted reference run to compare it with (tests/e2e/test_resume.py and each strategy's resume test)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from helpers import make_config, run_quietly

# small but with several checkpoints per task: 64 facts / batch 8 = 8 steps per epoch
FAST = ["device=cpu", "train.epochs=4", "checkpoint.every_n_steps=5", "checkpoint.keep_last=2"]


def start(run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cl_runner", f"hydra.run.dir={run_dir}", *FAST, *args],
                            cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)


def wait_for(predicate: Callable[[], object], timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("the run did not get there in time")
        time.sleep(0.02)


def outcome(run_dir: Path) -> tuple[str, dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    keys = ("average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer",
            "average_learning_curve_area", "per_task", "status")
    saved = {str(f.relative_to(run_dir)): hashlib.sha256(f.read_bytes()).hexdigest()  # save.final_model's weights
             for f in sorted(run_dir.glob("model/**/*.safetensors"))}
    return (run_dir / "accuracy_matrix.csv").read_text(), {**{k: metrics[k] for k in keys}, "saved_model": saved}


def reference(tmp_path: Path, *args: str) -> tuple[str, dict]:
    """The uninterrupted run, in this process (the same run() the CLI calls; a subprocess would only add its
    start-up time to every test)."""
    run_dir = tmp_path / "reference"
    run_quietly(make_config(*FAST, *args, small=False), run_dir)
    return outcome(run_dir)


def history_lines(run_dir: Path) -> int:
    try:
        return len((run_dir / "history.jsonl").read_text().splitlines())
    except OSError:
        return 0


def kill_and_resume(run_dir: Path, moments: list[tuple[int, float]], *args: str) -> int:
    """Start the run; at each moment (after its k-th finished epoch, plus a jitter in seconds) SIGKILL it and
    resume it; returns how many kills hit a running process."""
    proc, kills = start(run_dir, *args), 0
    for epochs_done, jitter in moments:
        wait_for(lambda k=epochs_done, p=proc: history_lines(run_dir) >= k or p.poll() is not None)
        time.sleep(jitter)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        proc = subprocess.Popen([sys.executable, "-m", "cl_runner", f"resume={run_dir}"], cwd=run_dir.parent,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return kills
