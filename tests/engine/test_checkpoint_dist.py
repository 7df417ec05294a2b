"""Distributed checkpoints (DCP): kill -9 of one rank mid-task, resume on 1 process (killed again), then on 2
processes, gives the accuracy matrix and loss curve of an uninterrupted 2-process run with fsdp and EWC (its
sharded anchor and Fisher go through DCP too; ddp writes the same DCP shards of whole tensors, and its
stop/checkpoint/resume path is tested in test_distributed.py); a damaged shard is moved aside and the
resume falls back to the previous checkpoint; only rank 0 writes the run's files, every rank its shards.

Each torchrun start costs seconds on a CPU, so one chain covers 2 -> 1 and 1 -> 2: four starts in all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_driver import NO_DROPOUT

from cl_runner.core import rng
from cl_runner.engine import checkpoint as ckpt
from cl_runner.engine.checkpoint import list_checkpoints

# 64 facts / batch 8 = 8 steps per epoch, 2 epochs, 3 tasks; a checkpoint after every step and best weights
# validated after every epoch (so mid-task checkpoints hold them, and epoch ends store them as a reference).
ARGS = [*NO_DROPOUT, "device=cpu", "train.epochs=2", "train.validate_every=1", "train.eval_batch_size=64",
        "checkpoint.every_n_steps=1", "checkpoint.keep_last=2"]


def torchrun(processes: int, run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", "-m", "cl_runner", *args],
                            cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process id of rank ``rank`` among the launcher's children (read from their environment)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.05)
    raise TimeoutError(f"no rank {rank} under {launcher.pid}")


def newest(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return int(found[-1].name.removeprefix("ckpt-")) if found else 0


def kill_after(launcher: subprocess.Popen, run_dir: Path, rank: int, number: int) -> None:
    """SIGKILL rank ``rank`` once checkpoint ``number`` (or a newer one) exists; torchrun then stops the job."""
    pid = rank_pid(launcher, rank)
    deadline = time.time() + 240
    while newest(run_dir) < number:
        assert launcher.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0  # torchrun reports the killed rank
    assert json.loads((run_dir / "metrics.json").read_text())["status"] != "completed"


def epochs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def matrix(run_dir: Path) -> str:
    return (run_dir / "accuracy_matrix.csv").read_text()


# 17 checkpoints per task (16 steps + the task end): 12 is in task 1's second epoch, 22 in task 2, where EWC's
# anchor and Fisher exist (under FSDP: DTensors, written through DCP as strategy shards)
@pytest.mark.slow
@pytest.mark.parametrize(("kind", "killed_rank", "strategy", "kill_at"), [("fsdp", 0, "ewc", 22)])
def test_kill_one_rank_resume_on_one_then_two_processes_matches(tmp_path, kind, killed_rank, strategy, kill_at):
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    args = [f"distributed={kind}", f"strategy={strategy}", *ARGS]
    finish(torchrun(2, reference, f"hydra.run.dir={reference}", *args))

    kill_after(torchrun(2, run_dir, f"hydra.run.dir={run_dir}", *args), run_dir, killed_rank, kill_at)
    first = newest(run_dir)
    damaged = list_checkpoints(run_dir)[-1]  # rank 1's shard of the newest one rots: the resume falls back
    shard = damaged / "shards" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    kill_after(torchrun(1, run_dir, f"resume={run_dir}"), run_dir, 0, first + 10)  # on 1 process, further on
    finish(torchrun(2, run_dir, f"resume={run_dir}"))

    assert matrix(run_dir) == matrix(reference)
    history, expected = epochs(run_dir), epochs(reference)
    assert [(h["task"], h["epoch"]) for h in history] == [(h["task"], h["epoch"]) for h in expected]
    # the loss curve too: the epochs trained on 1 process differ from 2 only by float rounding (sums in
    # another order, ~1e-6); a lost optimizer moment, RNG state or best copy moves a loss by far more
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in expected], rel=1e-4)
    assert [h["validation_score"] for h in history] == [h["validation_score"] for h in expected]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["checkpoints"]["count"] > first + 10
    # rank 0 alone wrote the run's files (rank 1 taking the lock too would have refused the run); the
    # newest checkpoint, written by 2 processes, holds both ranks' shards and nothing half-written is left
    newest_ckpt = list_checkpoints(run_dir)[-1]
    assert sorted(p.name for p in (newest_ckpt / "shards").iterdir()) == [".metadata", "__0_0.distcp",
                                                                           "__1_0.distcp"]
    assert not list((run_dir / "checkpoints").glob(".ckpt-*.tmp"))
    assert (run_dir / "checkpoints" / "damaged" / damaged.name / "shards" / "__1_0.distcp").exists()
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in reference.iterdir()}


def test_a_full_disk_on_any_rank_is_recognised():
    """DCP gathers every rank's failure into one CheckpointException: a full disk on rank 1 is still one."""
    import errno
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    full = OSError(errno.ENOSPC, "No space left on device")
    caught = CheckpointException("save failed", {1: (full, traceback.StackSummary())})
    other = CheckpointException("save failed", {1: (ValueError("bad"), traceback.StackSummary())})
    assert ckpt._disk_full(caught) and not ckpt._disk_full(other)


def test_rng_state_is_each_ranks_own_on_the_same_count_else_rank_0s(monkeypatch):
    saved = [{"rank": 0}, {"rank": 1}]
    for rank, size, expected in [(1, 2, 1), (0, 2, 0), (0, 1, 0), (2, 4, 0)]:
        monkeypatch.setattr(rng.dist, "world", lambda r=rank, n=size: rng.dist.World(r, n, r, "ddp"))
        assert rng.rank_rng(saved) == {"rank": expected}
    assert rng.rank_rng({"python": 1}) == {"python": 1}  # a single-process checkpoint
