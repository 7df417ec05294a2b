"""``cl-run resume=DIR key=value``: an option that cannot change a result (engine/claim.py's NEUTRAL_ON_RESUME)
is applied and the run finishes with the uninterrupted run's matrix; any other key is refused in one line naming
it, leaving the run directory as it was."""

from __future__ import annotations

import pytest
from helpers import SMALL, main_exit, make_config, run_quietly, snapshot
from resume_runs import outcome

from cl_runner import cli
from cl_runner.engine.claim import NEUTRAL_ON_RESUME, neutral_overrides
from cl_runner.engine.sequence import SequenceRun

ARGS = ("strategy=ewc", "strategy.fisher_batch_size=16", "strategy.fisher_samples=16", "train.max_steps=4",
        "train.keep_best=false", "eval.max_examples=16")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the uninterrupted run's outcome, a run stopped after its first task's checkpoint)."""
    root = tmp_path_factory.mktemp("resume_overrides")
    run_quietly(make_config(*ARGS), root / "reference")
    original = SequenceRun.train_task

    def stop_after_first(self, i, resume, progress):
        original(self, i, resume, progress)
        raise KeyboardInterrupt

    SequenceRun.train_task = stop_after_first
    try:  # the CLI, for the run's config.yaml
        with pytest.raises(SystemExit):
            cli.main([*SMALL, *ARGS, f"hydra.run.dir={root / 'stopped'}"])
    finally:
        SequenceRun.train_task = original
    return outcome(root / "reference"), root / "stopped"


@pytest.mark.slow
def test_a_neutral_override_resumes_to_the_same_matrix_and_another_is_refused(runs, capsys):
    expected, run_dir = runs
    before = snapshot(run_dir)
    code, lines = main_exit([f"resume={run_dir}", "train.lr=0.01"], capsys)
    assert (code, len(lines)) == (2, 1) and "resume: train.lr cannot change on resume" in lines[0], lines
    assert snapshot(run_dir) == before
    with pytest.raises(SystemExit) as ended:
        cli.main([f"resume={run_dir}", "strategy.fisher_batch_size=4", "train.eval_batch_size=5",
                  "train.log_every=3"])
    assert ended.value.code in (0, None)
    assert outcome(run_dir) == expected


def test_the_allowed_keys_and_groups():
    assert neutral_overrides(["strategy.fisher_batch_size=4", "logger.csv.flush=true"]) == {
        "strategy": {"fisher_batch_size": 4}, "logger": {"csv": {"flush": True}}}
    for bad in ("train.lr=1", "strategy.ewc_lambda=3", "+train.x=1", "checkpoint.enabled=false", "seed"):
        with pytest.raises(ValueError, match=r"^resume: "):
            neutral_overrides([bad])
    assert "checkpoint.enabled" not in NEUTRAL_ON_RESUME  # off, a resume would not look for its checkpoints
