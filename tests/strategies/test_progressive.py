"""progressive: later columns leave the backbone and earlier columns bit-identical, and earlier tasks' outputs
unchanged; a new column starts as the backbone; laterals read earlier columns and not the reverse; the reported
parameter counts match the formula; resume re-creates the columns; end to end."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config, run_quietly
from tiny_lm import logits, one_thread, tiny_context, tiny_model, train  # noqa: F401 (autouse fixture)

from cl_runner.core.errors import ConfigError
from cl_runner.strategies.progressive import ATTRIBUTE, Progressive, ProgressiveConfig

# the tiny model's adapted layers per block as (in, out): c_attn, attn.c_proj, c_fc, mlp.c_proj; two blocks
LAYERS = [(32, 96), (32, 32), (32, 128), (128, 32)] * 2
RANK = 2
COLUMN = sum(RANK * (i + o) for i, o in LAYERS)  # a column's own low-rank updates
GATES = sum(o for _, o in LAYERS)  # lateral gates per earlier column


def trained(tasks: int = 3, **options):
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=tasks), Progressive(ProgressiveConfig(rank=RANK, **options))
    outputs = []
    for task in range(tasks):
        train(ctx, strategy, task)
        strategy.before_eval(ctx, task)
        outputs.append(logits(model))
    return model, ctx, strategy, outputs


@pytest.mark.parametrize("backbone_first_task", [False, True])
def test_later_columns_leave_earlier_tasks_bit_identical(backbone_first_task):
    model = tiny_model()
    ctx = tiny_context(model)
    strategy = Progressive(ProgressiveConfig(rank=RANK, backbone_first_task=backbone_first_task))
    train(ctx, strategy, 0)
    for task in (1, 2):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        before_outputs = []
        for old in range(task):
            strategy.before_eval(ctx, old)
            before_outputs.append(logits(model))
        train(ctx, strategy, task)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        added = set(after) - set(before)
        assert added and all(k.startswith(f"{ATTRIBUTE}.{task}.") for k in added)  # the new column, only it
        for old in range(task):
            strategy.before_eval(ctx, old)
            assert torch.equal(logits(model), before_outputs[old])


def test_a_new_column_starts_as_the_backbone_and_an_unseen_task_uses_the_backbone():
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=3), Progressive(ProgressiveConfig(rank=RANK))
    train(ctx, strategy, 0)
    strategy.before_eval(ctx, 2)  # no column yet: the bare backbone
    assert strategy.hooks.active is None and torch.equal(logits(model), logits(tiny_model()))
    ctx.task_index = 1
    strategy.before_task(ctx)
    strategy.before_eval(ctx, 1)
    assert torch.equal(logits(model), logits(tiny_model()))  # B and the gates start at zero


def test_the_new_column_reads_the_earlier_columns_and_not_the_reverse():
    model, ctx, strategy, outputs = trained()
    columns = getattr(model, ATTRIBUTE)
    assert set(columns) == {"0", "1", "2"}
    with torch.no_grad():
        for b in columns["1"].B.values():
            b.add_(0.1)  # perturb column 1
    strategy.before_eval(ctx, 0)
    assert torch.equal(logits(model), outputs[0])  # column 0 never reads column 1
    strategy.before_eval(ctx, 2)
    assert not torch.allclose(logits(model), outputs[2])  # column 2 does (lateral gates)


@pytest.mark.parametrize(("backbone_first_task", "lateral"), [(False, True), (True, True), (False, False)])
def test_accounting_matches_the_parameter_formula(backbone_first_task, lateral):
    *_, strategy, _ = trained(backbone_first_task=backbone_first_task, lateral=lateral)
    gates = GATES if lateral else 0
    columns = {"t0": COLUMN, "t1": COLUMN + gates, "t2": COLUMN + 2 * gates}
    if backbone_first_task:  # column 0 is the whole LM; the later columns have one fewer earlier column
        columns = {"t0": sum(p.numel() for p in tiny_model().parameters()), "t1": COLUMN, "t2": COLUMN + gates}
    cost = strategy.accounting()
    assert cost["trainable_parameters_per_task"] == columns
    side = [v for k, v in columns.items() if k != "t0" or not backbone_first_task]
    assert cost["extra_parameters"] == sum(side) and cost["columns"] == len(side)
    assert cost["lateral_parameters"] == sum(side) - len(side) * COLUMN


def test_resume_recreates_the_columns():
    model, ctx, strategy, outputs = trained(tasks=2)
    fresh = tiny_model(seed=1)
    ctx2, resumed = tiny_context(fresh, tasks=2), Progressive(ProgressiveConfig(rank=RANK))
    resumed.load_state_dict(strategy.state_dict())
    resumed.on_resume(ctx2)
    fresh.load_state_dict(model.state_dict())
    for task in range(2):
        resumed.before_eval(ctx2, task)
        assert torch.equal(logits(fresh), outputs[task])
    trainable = [(n, p) for n, p in fresh.named_parameters() if p.requires_grad]
    assert {n for n, _ in trainable} == {n for n, _ in fresh.named_parameters() if n.startswith(f"{ATTRIBUTE}.1.")}
    assert sum(p.numel() for _, p in trainable) == strategy.trainable["t1"] > 0  # what the newest task trained


@pytest.mark.slow
def test_progressive_end_to_end_never_forgets_and_reports_its_cost(tmp_path):
    result = run_quietly(make_config("strategy=progressive", "train.epochs=1"), tmp_path)
    rows = [[stage["scores"][n]["score"] for n in result["tasks"]] for stage in result["stages"]][1:]
    for i, row in enumerate(rows):
        assert all(row[j] == rows[j][j] for j in range(i))
    cost = result["strategy_accounting"]
    assert cost["columns"] == 3 and cost["backbone_parameters"] == result["parameters"]["total"]
    assert list(cost["trainable_parameters_per_task"]) == result["tasks"]


def test_bad_options_fail_with_their_key():
    with pytest.raises(ConfigError, match="strategy.rank: expected a positive"):
        make_config("strategy=progressive", "strategy.rank=0")


@pytest.mark.gpu
@pytest.mark.parametrize("backbone_first_task", ["false", "true"])
def test_runs_on_cuda_in_bf16(tmp_path, backbone_first_task):
    overrides = ("strategy=progressive", f"strategy.backbone_first_task={backbone_first_task}", "device=cuda")
    result = run_quietly(make_config(*overrides, "train.epochs=1"), tmp_path)
    assert result["status"] == "completed" and result["precision"] == "bf16"
