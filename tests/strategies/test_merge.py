"""strategy=merge: the merging formulas against hand computations and peft's, the strategy's weights after a
task (merged; the next task's start for when=end and sequential), options refused, and short runs."""

from __future__ import annotations

import json
import warnings
from contextlib import nullcontext

import pytest
import torch
from helpers import make_config, run_quietly

from cl_runner.core.errors import ConfigError
from cl_runner.strategies.base import Context
from cl_runner.strategies.merge import FullMerge, MergeConfig, set_weights
from cl_runner.strategies.merge_methods import (
    dare_drop,
    empty_state,
    fold,
    kth_largest_magnitude,
    linear_coefficients,
    merged_update,
    trim,
)

T1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
T2 = torch.tensor([-4.0, 2.0, 0.25, -1.5])
T3 = torch.tensor([1.0, -3.0, -0.5, 2.0])


def merge(method: str, taus: list[torch.Tensor], lam: float = 1.0, combine: str = "task_arithmetic") -> torch.Tensor:
    state = empty_state(taus[0], method, combine, torch.float32)
    for tau in taus:
        state = fold(state, tau, method, combine)
    return merged_update(state, method, len(taus), lam, combine)


def test_task_arithmetic_average_and_magmax_by_hand():
    assert merge("task_arithmetic", [T1, T2, T3], lam=0.5).tolist() == [0.0, -1.0, 0.125, -0.75]
    assert merge("average", [T1, T2]).tolist() == [-0.5, 0.5, 0.375, -1.75]
    # per entry the value of largest |.|: -4 (T2), -3 (T3), 0.5 (T1; T3's -0.5 ties: the earliest stays), -2 (T1)
    assert merge("magmax", [T1, T2, T3], lam=2.0).tolist() == [-8.0, -6.0, 1.0, -4.0]


def test_ties_by_hand():
    """density 0.5 keeps each vector's 2 largest entries; signs elected by the sum; mean of the agreeing ones."""
    trimmed = [trim(t, kth_largest_magnitude(lambda t=t: [t], 2)) for t in (T1, T2, T3)]
    assert [t.tolist() for t in trimmed] == [[3, 0, 0, -2], [-4, 2, 0, 0], [0, -3, 0, 2]]
    # entry 0: 3 - 4 = -1 -> '-': mean(-4); 1: 2 - 3 -> '-': -3; 2: nothing kept: 0; 3: -2 + 2 = 0 -> '+': 2
    assert merge("ties", trimmed, lam=0.5).tolist() == [-2.0, -1.5, 0.0, 1.0]


def test_ties_and_dare_ties_agree_with_peft():
    from peft.utils.merge_utils import ties

    gen = torch.Generator().manual_seed(0)
    taus = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    ones = torch.ones(3)
    k = int(0.3 * taus[0].numel())
    ours = merge("ties", [trim(t, kth_largest_magnitude(lambda t=t: [t], k)) for t in taus], lam=0.7)
    torch.testing.assert_close(ours, 0.7 * ties(taus, ones, 0.3, "total"))
    dropped = [dare_drop(t, torch.rand(t.shape, generator=gen), 0.4) for t in taus]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "density 1: no pruning", which is the point here
        torch.testing.assert_close(merge("dare", dropped, combine="ties"), ties(dropped, ones, 1.0, "total"))


def test_dare_drop_by_hand():
    uniform = torch.tensor([0.1, 0.6, 0.5, 0.9])
    assert dare_drop(T1, uniform, 0.5).tolist() == [0.0, -2.0, 1.0, -4.0]
    assert torch.equal(dare_drop(T1, uniform, 0.0), T1)


def test_global_threshold_is_the_kth_largest_magnitude_over_all_tensors():
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(7, 3, generator=gen), torch.randn(11, generator=gen)]
    flat = torch.cat([p.flatten() for p in parts]).abs()
    for k in (1, 5, 31, 32):
        assert kth_largest_magnitude(lambda: parts, k) == flat.topk(k).values[-1].item()
    assert kth_largest_magnitude(lambda: parts, 0) == float("inf")


def test_linear_coefficients_of_chained_adapters():
    chain = [[1.0], [1.0, 1.0], [1.0, 1.0, 1.0]]  # when=end: tau_k = adapters 0..k at weight 1
    assert linear_coefficients("task_arithmetic", 0.5, chain) == [1.5, 1.0, 0.5]
    assert linear_coefficients("average", 1.0, chain) == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_scaled_adapters_equal_peft_cat_combination():
    """over=lora's merge (every adapter active, scaled by set_scale) is peft's add_weighted_adapter 'cat'."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]), adapter_name="task0")
    model.add_adapter("task1", LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    weights = [0.75, -0.5]
    model.base_model.add_weighted_adapter(["task0", "task1"], weights, "merged", combination_type="cat")
    x = torch.randn(4, 6)
    model.base_model.set_adapter("merged")
    expected = model(x)
    model.base_model.set_adapter(["task0", "task1"])
    set_weights(model, weights)
    torch.testing.assert_close(model(x), expected)


def context(model: torch.nn.Module, task: int) -> Context:
    return Context(model=model, device=torch.device("cpu"), autocast=nullcontext, collate=None,
                   task_names=["a", "b"], train_sets=[[], []], task_index=task)


@pytest.mark.parametrize("when", ["end", "sequential"])
def test_weights_after_a_task_are_the_merge_and_the_next_task_starts_where_when_says(when):
    model = torch.nn.Linear(2, 2, bias=False)
    theta0 = model.weight.detach().clone()
    strategy = FullMerge(MergeConfig(method="task_arithmetic", lam=0.5, when=when))
    fine_tuned = []
    for task, tau in enumerate((torch.ones(2, 2), torch.full((2, 2), 3.0))):
        strategy.before_task(context(model, task))
        with torch.no_grad():
            model.weight.add_(tau)  # "training": tau_task = theta_task - theta_0
        fine_tuned.append(model.weight.detach().clone())
        strategy.after_task(context(model, task))
        taus = [w - theta0 for w in fine_tuned]
        torch.testing.assert_close(model.weight.detach(), theta0 + 0.5 * sum(taus))
    second_start = fine_tuned[0] if when == "end" else theta0 + 0.5 * (fine_tuned[0] - theta0)
    torch.testing.assert_close(fine_tuned[1], second_start + 3.0)
    start = FullMerge(strategy.cfg)  # a resumed strategy: the state holds everything the next task needs
    start.load_state_dict(strategy.state_dict())
    merged = model.weight.detach().clone()
    start.before_task(context(model, 2))
    torch.testing.assert_close(model.weight.detach(), fine_tuned[-1] if when == "end" else merged)
    assert start.accounting()["merge_coefficients"] == [[0.5], [0.5, 0.5]]


@pytest.mark.parametrize("override, key", [
    ("strategy.density=0", "strategy.density"), ("strategy.drop=1.0", "strategy.drop"),
    ("strategy.method=nope", "strategy.method"), ("strategy.when=later", "strategy.when"),
    ("strategy.over=lora", "strategy.method"), ("strategy.lam=0", "strategy.lam")])
def test_bad_options_are_refused_at_compose_time(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        make_config("strategy=merge", override)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["strategy.when=sequential", "strategy.method=ties"],
                                   ["strategy.when=end", "strategy.over=lora", "strategy.method=average"]])
def test_short_runs_finish_and_report_the_merge_coefficients(tmp_path, extra):
    run_quietly(make_config("strategy=merge", "train.epochs=1", *extra), tmp_path / "run")
    costs = json.loads((tmp_path / "run" / "metrics.json").read_text())["strategy_accounting"]
    assert costs["merge_coefficients"] and costs["merge_lambda"] == 1.0
