"""Claiming a run directory (engine/claim.py, engine/runtime.py's lock): one lock per run, not re-entrant, so a
second start in the same process is refused like one in another process; a start continues the run its directory
holds, refuses another experiment's, leaves a finished one alone, and calls the caller's hooks only once claimed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_config

from cl_runner.core.errors import UserError
from cl_runner.engine.claim import RunHooks, claim, run_is_finished
from cl_runner.engine.run import run
from cl_runner.engine.runtime import run_lock


class Recorder(RunHooks):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def claimed(self, run_dir: Path, resume: bool) -> None:
        self.calls.append(("claimed", resume))

    def ended(self, run_dir: Path, error: BaseException | None) -> None:
        self.calls.append(("ended", type(error).__name__ if error else None))


def test_the_lock_is_held_once_even_within_one_process(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(UserError, match="is in use by another cl-run"), run_lock(tmp_path):
            pass
    with run_lock(tmp_path):  # released: the next start gets it
        pass


def test_a_run_inside_a_held_lock_is_refused_having_written_nothing(tmp_path):
    run_dir = tmp_path / "run"
    hooks = Recorder()
    with run_lock(run_dir):
        before = sorted(p.name for p in run_dir.iterdir())
        with pytest.raises(UserError, match="is in use by another cl-run"):
            run(make_config(), run_dir, "seed: 0\n", hooks=hooks)
        assert sorted(p.name for p in run_dir.iterdir()) == before == [".lock"]
    assert hooks.calls == []


def test_claim_continues_this_experiment_and_refuses_another(tmp_path):
    hooks = Recorder()
    assert claim(tmp_path, "seed: 0\n", None, hooks) is False  # nothing there yet: a fresh start
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert claim(tmp_path, "seed: 0\n", None, hooks) is True  # the same experiment: continued
    assert hooks.calls == [("claimed", False), ("claimed", True)]
    with pytest.raises(UserError, match="already holds a different experiment"):
        claim(tmp_path, "seed: 1\n", None, hooks)
    assert len(hooks.calls) == 2  # refused: never claimed
    assert claim(tmp_path, "seed: 1\n", False, hooks) is False  # an explicit start compares nothing


def test_a_finished_run_is_left_alone_and_never_claimed(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed", "average_accuracy": 0.5}))
    hooks = Recorder()
    assert run_is_finished(tmp_path)
    assert claim(tmp_path, "seed: 0\n", None, hooks) is None and hooks.calls == []
    metrics = run(make_config(), tmp_path, "seed: 0\n", resume=None, hooks=hooks)
    assert metrics == {"status": "completed", "average_accuracy": 0.5} and hooks.calls == []
