"""What evaluation costs: validation only every ``train.validate_every`` epochs (and after the last), only when
that gives two or more epochs to choose between, on a
seeded fixed sample of ``train.max_validation_examples``; the stage schedule ``eval.full_every`` and the metrics
of a matrix with unscored cells (hand-computed), written as empty CSV cells."""

import csv
from contextlib import nullcontext

import pytest
import torch
from helpers import make_config, run_quietly
from tiny_loop import context, examples, tiny_model

from cl_runner.config.schema import EvalConfig, TrainConfig
from cl_runner.engine.loop import LoopCallbacks, TaskRun, train_task
from cl_runner.outputs.results import RunWriter
from cl_runner.scoring import cl_metrics as metrics
from cl_runner.scoring.evaluate import Scorer
from cl_runner.scoring.sequence import SequenceScorer, stage_tasks
from cl_runner.strategies.base import Strategy
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask, EvalItem


class Records(LoopCallbacks):
    def __init__(self):
        self.records = []

    def on_epoch(self, record):
        self.records.append(record)


@pytest.mark.parametrize(("epochs", "every", "keep_best", "validated"),
                         [(7, 3, True, [3, 6, 7]), (6, 3, True, [3, 6]), (3, 1, True, [1, 2, 3]),
                          (6, 5, True, [5, 6]), (7, 3, False, []),
                          # one validated epoch (the last) has nothing to choose: no validation pass at all
                          (4, 10, True, []), (5, 5, True, []), (1, 1, True, []), (1, 5, True, [])])
def test_validation_runs_every_n_epochs_and_after_the_last_when_it_chooses(epochs, every, keep_best, validated):
    data, calls, events = examples(8), [], Records()
    cfg = TrainConfig(epochs=epochs, batch_size=4, validate_every=every, keep_best=keep_best)
    train_task(TaskRun(context(tiny_model(), data), Strategy(), data, cfg,
                       validate=lambda idx: calls.append(idx) or -float(len(calls)), callbacks=events))
    assert len(calls) == len(validated)
    assert [r.epoch for r in events.records if r.validation_score is not None] == validated


def _scorer(n_validation: int, cap: int | None, seed: int = 0) -> SequenceScorer:
    items = [EvalItem(prompt_ids=[3 + i % 30, 4], target_ids=[5, 1], target="") for i in range(n_validation)]
    encoded = EncodedTask(name="a", train=[], validation=items, test=items[:3], label_ids=None)
    scorer = Scorer(model=tiny_model(), pad_id=0, eos_id=1, device=torch.device("cpu"), autocast=nullcontext,
                    batch_size=8, cfg=EvalConfig(), decode=str)
    task = Task(name="a", metric="perplexity", train=[], validation=[], test=[])
    return SequenceScorer(scorer, [task], [encoded], Strategy(), context(scorer.model, examples(4)),
                          max_validation_examples=cap, seed=seed)


def test_validation_uses_a_seeded_sample_fixed_across_epochs():
    sequence = _scorer(40, cap=10)
    first = sequence.validation_set(0).validation
    assert len(first) == 10 and all(item in sequence.encoded[0].validation for item in first)
    assert sequence.validation_set(0).validation is first  # the same sample every epoch
    assert _scorer(40, cap=10).validation_set(0).validation == first  # the same seed, the same sample
    assert _scorer(40, cap=10, seed=1).validation_set(0).validation != first
    assert sequence.score("validation", [0])[0]["n"] == 10  # validation scores the sample...
    assert sequence.score("test", [0])[0]["n"] == 3  # ...and the matrix the whole test split
    assert _scorer(8, cap=10).score("validation", [0])[0]["n"] == 8  # fewer than the cap: all of them


def test_the_stage_schedule_scores_everything_every_n_tasks_and_at_the_end():
    assert [stage_tasks(i, 5, 1) for i in range(5)] == [list(range(5))] * 5
    assert [stage_tasks(i, 5, 2) for i in range(5)] == [[0, 1], list(range(5)), [2, 3], list(range(5)),
                                                       list(range(5))]
    assert [stage_tasks(i, 3, 10) for i in range(3)] == [[0, 1], [1, 2], [0, 1, 2]]


# init and three stages: stage 0 scored tasks 0 and 1 only, stage 1 tasks 1 and 2, the final stage all
INIT = [0.1, 0.2, 0.3]
PARTIAL = [[0.9, 0.5, None], [None, 0.8, 0.6], [0.4, 0.7, 0.9]]


def test_metrics_of_a_matrix_with_unscored_cells_are_hand_computed():
    out = metrics.summarize(PARTIAL, INIT, [True] * 3, ["a", "b", "c"])
    assert out["average_accuracy"] == pytest.approx((0.4 + 0.7 + 0.9) / 3)
    assert out["backward_transfer"] == pytest.approx(((0.4 - 0.9) + (0.7 - 0.8)) / 2)
    assert out["forward_transfer"] == pytest.approx(((0.5 - 0.2) + (0.6 - 0.3)) / 2)
    # best over the scored stages: a: 0.9 (stage 1 unscored) - 0.4; b: 0.8 - 0.7
    assert [t["forgetting"] for t in out["per_task"]] == pytest.approx([0.5, 0.1, None])
    assert out["average_forgetting"] == pytest.approx(0.3)
    assert [t["best"] for t in out["per_task"]] == [0.9, 0.8, 0.9]
    # straight lines between scored points: a (0,.1) (1,.9) (3,.4); b every stage; c (0,.3) (2,.6) (3,.9)
    areas = [(0.5 + 2 * 0.65) / 3, (0.35 + 0.65 + 0.75) / 3, (2 * 0.45 + 0.75) / 3]
    assert [t["learning_curve_area"] for t in out["per_task"]] == pytest.approx(areas)


def test_the_final_row_must_be_complete():
    with pytest.raises(ValueError, match="final row"):
        metrics.summarize([[0.9, None], [0.4, None]], [0.1, 0.2], [True] * 2, ["a", "b"])


def test_unscored_cells_are_empty_in_the_csv(tmp_path):
    writer = RunWriter(tmp_path, ["a", "b", "c"])
    writer.set_rows([INIT, *PARTIAL])
    rows = list(csv.reader((tmp_path / "accuracy_matrix.csv").open()))
    assert rows[1] == ["init", "0.1", "0.2", "0.3"]
    assert rows[2] == ["after_a", "0.9", "0.5", ""] and rows[3] == ["after_b", "", "0.8", "0.6"]


@pytest.mark.slow
def test_a_run_with_a_stage_schedule_leaves_only_the_skipped_cells_empty(tmp_path):
    small = [f"tasks.tasks.{i}.num_subjects=8" for i in range(3)]
    cfg = make_config("train.epochs=1", "eval.full_every=2", *small)
    result = run_quietly(cfg, tmp_path)
    rows = list(csv.reader((tmp_path / "accuracy_matrix.csv").open()))
    empty = [[cell == "" for cell in row[1:]] for row in rows[1:]]
    assert empty == [[False] * 3, [False, False, True], [False] * 3, [False] * 3]  # after color: color and city
    assert result["stages"][1]["scores"]["food"] == {"score": None}
    assert all(result[k] is not None for k in ("average_accuracy", "backward_transfer", "forward_transfer"))
