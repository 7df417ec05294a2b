"""Recovery that cannot trap: damaged checkpoints are moved aside and the run falls back to an older one (or
restarts, keeping the earlier results); numbers never repeat; a resume rewrites history.jsonl and metrics.json
from the checkpoint's state (no epoch twice, none lost); a full disk stops the run with one line and exit 5 and
the resume afterwards is exact; a checkpoint that no longer fits an edited config.yaml is refused untouched."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from helpers import cl_run
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console

from cl_runner.cli import CONF_DIR
from cl_runner.config.validate import register_configs, validate
from cl_runner.core import rng
from cl_runner.core.errors import CheckpointMismatch, DiskFullError
from cl_runner.core.files import is_disk_full, write_atomic
from cl_runner.engine import checkpoint as ckpt
from cl_runner.engine import sequence
from cl_runner.engine.run import run
from cl_runner.engine.weights import weights_mismatch
from cl_runner.outputs.results import RunWriter

register_configs()
# 3 tasks of 16 facts, batch 4: 4 steps per epoch, 2 epochs, validated every epoch (so checkpoints hold best weights)
SMALL = ["device=cpu", "train.epochs=2", "train.batch_size=4", "train.validate_every=1", "train.eval_batch_size=64",
         "checkpoint.keep_last=2",  # a fallback to fall back to when the newest is damaged
         *(f"tasks.tasks.{i}.num_subjects=16" for i in range(3))]
STABLE = ("task", "task_index", "epoch", "step", "train_loss", "validation_score", "lr", "skipped_steps", "extras")


def small(*overrides: str):
    """The real composed config, shrunk; returns (Config, the config.yaml text cl-run would save)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        composed = compose("config", overrides=[*SMALL, *overrides])
    return validate(composed), OmegaConf.to_yaml(composed, resolve=True)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def history(run_dir: Path) -> list[dict]:
    """history.jsonl without its timings."""
    path = run_dir / "history.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: json.loads(line)[k] for k in STABLE} for line in lines]


def outcome(run_dir: Path) -> tuple[str, list[dict], dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    keys = ("status", "stages", "average_accuracy", "average_forgetting", "backward_transfer", "per_task")
    return (run_dir / "accuracy_matrix.csv").read_text(), history(run_dir), {k: metrics[k] for k in keys}


class Stop(Exception):
    """Stands for a kill: raised once history.jsonl holds a given number of lines (before that epoch's
    boundary, where a checkpoint could be written)."""


def stop_at(monkeypatch, run_dir: Path, lines: int) -> None:
    real = sequence._TaskCallbacks.on_epoch

    def on_epoch(self, record):
        real(self, record)
        if len(history(run_dir)) >= lines:
            raise Stop(lines)

    monkeypatch.setattr(sequence._TaskCallbacks, "on_epoch", on_epoch)


def stopped_run(monkeypatch, run_dir: Path, lines: int, *overrides: str) -> None:
    cfg, text = small(*overrides)
    with monkeypatch.context() as patch, pytest.raises(Stop):
        stop_at(patch, run_dir, lines)
        run(cfg, run_dir, text, console=quiet())


def tree(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def rewrite_manifest(path: Path) -> None:
    """Make the manifest agree with the files again (damage the CRC check cannot see)."""
    files = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    manifest = {"files": {f: {"bytes": (path / f).stat().st_size, "crc32": zlib.crc32((path / f).read_bytes())}
                          for f in files}}
    (path / "manifest.json").write_text(json.dumps(manifest))


def fsync_paths(monkeypatch) -> list[str]:
    """Record the path of every file (or directory) os.fsync is called on, in order."""
    real, paths = os.fsync, []
    monkeypatch.setattr(os, "fsync", lambda fd: paths.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    return paths


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[tuple[str, list[dict], dict], dict, list[str]]:
    """An uninterrupted run with checkpoints every 3 steps: its outcome, metrics and the paths it fsynced."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cfg, text = small("checkpoint.every_n_steps=3")
    with pytest.MonkeyPatch.context() as patch:
        paths = fsync_paths(patch)
        metrics = run(cfg, run_dir, text, console=quiet())
    return outcome(run_dir), metrics, [p.replace(str(run_dir), "<run>") for p in paths]


# ---- unit tests: no training ----

def tiny_checkpoint(run_dir: Path, number: int, width: int = 4, best: bool = True) -> Path:
    model = torch.nn.Linear(width, 2)
    state = {"run": {k: None for k in ckpt.SAVED} | {"info": {"tasks": ["a"]}}, "task": None, "strategy": {},
             "extras": {}, "rng": rng.rng_state()}
    weights = {k: v.clone() for k, v in model.state_dict().items()} if best else None
    return ckpt.save_checkpoint(run_dir, number, model, state, weights, keep_last=10)[0]


def test_next_number_counts_damaged_checkpoints_and_the_run_state(tmp_path):
    tiny_checkpoint(tmp_path, 3)
    (tmp_path / "checkpoints" / "damaged" / "ckpt-000007").mkdir(parents=True)
    assert ckpt.next_number(tmp_path, 2) == 8
    assert ckpt.next_number(tmp_path, 11) == 12


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    for number in (5, 6):
        tiny_checkpoint(tmp_path, number)
    model = torch.nn.Linear(4, 2)
    path, _ = ckpt.save_checkpoint(tmp_path, 7, model, {"x": 1}, None, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000007"] and path.is_dir()


def flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


DAMAGE = {  # damage -> the file the reason names
    "a flipped byte": (lambda p: flip(p / "model.safetensors"), "model.safetensors: size or CRC32"),
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "manifest.json"),
    "state.pt unpicklable": (lambda p: (p / "state.pt").write_bytes(b"garbage" * 10), "state.pt"),
    "state.pt incomplete": (lambda p: torch.save({"run": {}}, p / "state.pt"), "state.pt: lacks task"),
    "model header garbage": (lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors"),
    "best header garbage": (lambda p: (p / "best.safetensors").write_bytes(b"{}" * 8), "best.safetensors"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_passed_over_for_the_previous_one(tmp_path, damage):
    older, newest = tiny_checkpoint(tmp_path, 1), tiny_checkpoint(tmp_path, 2)
    harm, reason = DAMAGE[damage]
    harm(newest)
    if damage not in ("a flipped byte", "no manifest"):
        rewrite_manifest(newest)  # damage the manifest cannot see: only loading finds it
    found, damaged = ckpt.newest_readable(tmp_path)
    assert found.path == older and [p for p, _ in damaged] == [newest]
    assert reason in damaged[0][1]


def test_damaged_checkpoint_is_moved_aside_with_one_warning(tmp_path, caplog):
    path = tiny_checkpoint(tmp_path, 4)
    with caplog.at_level(logging.WARNING):
        moved = ckpt.move_aside(path, "state.pt: UnpicklingError")
    assert moved == tmp_path / "checkpoints" / "damaged" / "ckpt-000004" and moved.is_dir() and not path.exists()
    assert len(caplog.records) == 1 and "state.pt: UnpicklingError" in caplog.text
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.next_number(tmp_path, 0) == 5


def test_weights_of_another_size_are_named():
    path_model = torch.nn.Linear(4, 2)
    wider = {"weight": (2, 8), "bias": (2,)}
    assert weights_mismatch(path_model, wider) == "model.safetensors: weight is [2, 8], the model's is [2, 4]"
    assert "1 weights missing (bias)" in weights_mismatch(path_model, {"weight": (2, 4)})
    assert weights_mismatch(path_model, {"weight": (2, 4), "bias": (2,)}, {"weight": (2, 4)}) == (
        "best.safetensors: 1 weights missing (bias)")
    tied = torch.nn.Module()
    tied.a = torch.nn.Linear(3, 3, bias=False)
    tied.b = torch.nn.Linear(3, 3, bias=False)
    tied.b.weight = tied.a.weight  # saved once by safetensors
    assert weights_mismatch(tied, {"a.weight": (3, 3)}) is None


@pytest.mark.parametrize(("exc", "full"), [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("unexpected pos 576 vs 534"), False),
])
def test_disk_full_is_recognised_also_when_wrapped(exc, full):
    assert is_disk_full(exc) is full
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = exc  # what torch.save into a Python file raises
    assert is_disk_full(wrapped) is full


def no_space(first: int, calls: int = 1_000_000):
    """An os.fsync that fails with ENOSPC on ``calls`` calls from its ``first`` (counted from 0) on."""
    real, seen = os.fsync, []

    def fsync(fd):
        seen.append(fd)
        if first < len(seen) <= first + calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    return fsync


def test_full_disk_during_a_checkpoint_leaves_no_temporary_files(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path, 1)
    monkeypatch.setattr(os, "fsync", no_space(1))
    with pytest.raises(DiskFullError) as caught:
        tiny_checkpoint(tmp_path, 2)
    assert str(tmp_path / "checkpoints" / ".ckpt-000002.tmp") in str(caught.value)
    assert "no space left on device (writing " in str(caught.value) and caught.value.exit_code == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-000001"]


def test_full_disk_during_a_result_file_keeps_the_old_one(tmp_path, monkeypatch):
    write_atomic(tmp_path / "metrics.json", "old")
    monkeypatch.setattr(os, "fsync", no_space(0))
    with pytest.raises(DiskFullError, match=r"metrics.json: no space left on device \(writing 3 B;"):
        write_atomic(tmp_path / "metrics.json", "new")
    assert os.listdir(tmp_path) == ["metrics.json"] and (tmp_path / "metrics.json").read_text() == "old"
    writer = RunWriter(tmp_path, ["a"])
    writer.write_metrics({"status": "failed"})  # recording a failure only warns
    with pytest.raises(DiskFullError):
        writer.write_metrics({"status": "running"})


def test_supersede_keeps_the_earlier_results(tmp_path):
    writer = RunWriter(tmp_path, ["a"])
    writer.set_rows([[0.5]])
    writer.write_metrics({"status": "failed"})
    assert writer.supersede() == tmp_path / "superseded" / "1"
    assert sorted(os.listdir(tmp_path / "superseded" / "1")) == ["accuracy_matrix.csv", "metrics.json"]
    assert writer.supersede() is None and writer.rows == []


# ---- end to end (in-process runs of the small config) ----

@pytest.mark.slow
def test_stopped_at_every_epoch_boundary_before_a_checkpoint_resumes_without_duplicates(tmp_path, monkeypatch):
    """Automatic checkpoints come >= 30 s apart, so in this short run only task ends are checkpointed; the run
    is stopped after each epoch in turn, each stop a resume of the previous one."""
    cfg, text = small()
    expected = run(cfg, tmp_path / "reference", text, console=quiet())
    want = outcome(tmp_path / "reference")
    run_dir = tmp_path / "stopped"
    for lines in range(1, len(want[1]) + 1):
        with monkeypatch.context() as patch, pytest.raises(Stop):
            stop_at(patch, run_dir, lines)
            run(cfg, run_dir, text, console=quiet(), resume=lines > 1)
        assert history(run_dir) == want[1][:lines]  # no (task, epoch) twice, none missing
    resumed = run(cfg, run_dir, text, console=quiet(), resume=True)
    assert outcome(run_dir) == want
    assert resumed["checkpoints"]["count"] == expected["checkpoints"]["count"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["state.pt unpicklable", "model header garbage", "best header garbage"])
def test_newest_checkpoint_that_fails_to_load_falls_back_exactly(tmp_path, monkeypatch, reference, damage, caplog):
    run_dir = tmp_path / "run"
    stopped_run(monkeypatch, run_dir, 4, "checkpoint.every_n_steps=3")  # task 2, epoch 2: step 6 checkpointed
    newest = ckpt.list_checkpoints(run_dir)[-1]
    assert (newest / "best.safetensors").exists()
    DAMAGE[damage][0](newest)
    rewrite_manifest(newest)
    cfg, text = small("checkpoint.every_n_steps=3")
    with caplog.at_level(logging.WARNING):
        metrics = run(cfg, run_dir, text, console=quiet(), resume=True)
    assert f"checkpoint {newest} is damaged ({DAMAGE[damage][1]}" in caplog.text
    assert (run_dir / "checkpoints" / "damaged" / newest.name).is_dir()
    assert outcome(run_dir) == reference[0]
    newest_number = int(ckpt.list_checkpoints(run_dir)[-1].name.split("-")[1])
    assert metrics["checkpoints"]["count"] == newest_number > int(newest.name.split("-")[1])


@pytest.mark.slow
def test_all_checkpoints_damaged_restarts_and_keeps_the_earlier_results(tmp_path, monkeypatch, reference, caplog):
    run_dir = tmp_path / "run"
    stopped_run(monkeypatch, run_dir, 4, "checkpoint.every_n_steps=3")
    damaged = ckpt.list_checkpoints(run_dir)
    earlier = {f: (run_dir / f).read_text() for f in ("accuracy_matrix.csv", "history.jsonl", "metrics.json")}
    for path in damaged:
        flip(path / "model.safetensors")
    cfg, text = small("checkpoint.every_n_steps=3")
    with caplog.at_level(logging.WARNING):
        metrics = run(cfg, run_dir, text, console=quiet(), resume=True)
    assert "starting the run from the beginning (the earlier results are kept in" in caplog.text
    assert {f: (run_dir / "superseded" / "1" / f).read_text() for f in earlier} == earlier
    assert sorted(os.listdir(run_dir / "checkpoints" / "damaged")) == [p.name for p in damaged]
    assert outcome(run_dir) == reference[0]
    kept = ckpt.list_checkpoints(run_dir)
    assert len(kept) == 2 and kept[0].name > damaged[-1].name
    assert metrics["checkpoints"]["count"] == int(kept[-1].name.split("-")[1])


FULL_AT = {  # which write fails: the fsync of (path pattern, its k-th occurrence) -> the path the line names
    "checkpoint": ("<run>/checkpoints/.ckpt-", 7, "checkpoints/.ckpt-"),
    "history": ("<run>/history.jsonl", 3, "history.jsonl: no space left on device (writing "),
    "metrics": ("<run>/.metrics.json.tmp", 2, "metrics.json: no space left on device (writing "),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", FULL_AT)
def test_disk_full_stops_the_run_cleanly_and_the_resume_is_exact(tmp_path, monkeypatch, reference, what):
    pattern, k, names = FULL_AT[what]
    n = [i for i, p in enumerate(reference[2]) if p.startswith(pattern)][k]
    run_dir = tmp_path / "run"
    cfg, text = small("checkpoint.every_n_steps=3")
    with monkeypatch.context() as patch, pytest.raises(DiskFullError) as caught:
        patch.setattr(os, "fsync", no_space(n, calls=1))  # the small metrics.json still fits afterwards
        run(cfg, run_dir, text, console=quiet())
    assert caught.value.exit_code == 5 and str(caught.value).startswith(f"{run_dir}/{names}")
    assert f"free some space, then continue with: cl-run resume={run_dir}" in str(caught.value)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"
    assert list(run_dir.rglob("*.tmp")) == []
    metrics = run(cfg, run_dir, text, console=quiet(), resume=True)
    assert outcome(run_dir) == reference[0]
    assert metrics["checkpoints"]["count"] == reference[1]["checkpoints"]["count"]


@pytest.mark.slow
@pytest.mark.parametrize(("edit", "what"), [
    ("strategy=lwf", r"\(strategy state: KeyError 'teacher'; edited since: strategy.alpha, strategy.name, "),
    ("model.arch.n_embd=64", r"\(model.safetensors: transformer\.\S+ is \[\d+, 128\], the model's is "
                             r"\[\d+, 64\]; edited since: model.arch.n_embd\)"),
])
def test_resume_after_config_yaml_was_edited_is_refused_untouched(tmp_path, monkeypatch, edit, what):
    run_dir = tmp_path / "run"
    stopped_run(monkeypatch, run_dir, 3)
    (run_dir / "config.yaml").write_text(small(edit)[1])
    before = tree(run_dir)
    proc = cl_run(f"resume={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("cl-run: error:")]
    assert line.startswith(f"cl-run: error: resume: checkpoint {run_dir}/checkpoints/ckpt-")
    assert re.search(f"does not match {run_dir}/config.yaml {what}", line), line
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 3 and tree(run_dir) == before
    with pytest.raises(CheckpointMismatch):  # the same in-process, before anything is written
        run(small(edit)[0], run_dir, console=quiet(), resume=True)
    assert tree(run_dir) == before


@pytest.mark.slow
def test_sigkill_after_an_epoch_before_the_first_checkpoint_then_resume(tmp_path):
    args = ["device=cpu", "train.epochs=3", "train.eval_batch_size=64"]  # automatic checkpoints: >= 30 s apart
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    assert cl_run(f"hydra.run.dir={reference_dir}", *args, cwd=tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "cl_runner", f"hydra.run.dir={run_dir}", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(history(run_dir)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.list_checkpoints(run_dir) == []  # killed in the first task, after an epoch
    assert cl_run(f"resume={run_dir}", cwd=tmp_path).returncode == 0
    assert outcome(run_dir) == outcome(reference_dir)
