"""SI's path integral and MAS's importance against brute-force computations; both options refused at compose time."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from helpers import make_config
from tiny_lm import one_thread, tiny_context, tiny_model, train  # noqa: F401 (autouse fixture)

from cl_runner.core.errors import UserError
from cl_runner.strategies.base import Context
from cl_runner.strategies.si_mas import MAS, SI, MASConfig, SIConfig


def linear_context(model: torch.nn.Module) -> Context:
    return Context(model=model, device=torch.device("cpu"), autocast=nullcontext, collate=None,
                   task_names=["a", "b"], train_sets=[[], []])


def test_si_path_integral_is_minus_task_gradient_times_update_summed_by_hand():
    """Two tasks of three SGD steps on a linear model, the second one under the penalty: omega must use the
    task loss's gradient (not the penalty's), summed per optimizer step, and Omega = omega / (Delta^2 + xi)."""
    torch.manual_seed(0)
    model, lr, xi = torch.nn.Linear(3, 2), 0.1, 0.05
    ctx = linear_context(model)
    si = SI(SIConfig(si_lambda=5.0, xi=xi))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    data = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(6)]
    penalised = [False, False]  # whether the penalty's gradient joined the task's (after it was kept)
    for task in range(2):
        ctx.task_index, ctx.step = task, 0
        si.before_task(ctx)
        start = [p.detach().clone() for p in model.parameters()]
        omega = [torch.zeros_like(p) for p in model.parameters()]
        for x, y in data[3 * task : 3 * task + 3]:
            ((model(x) - y) ** 2).mean().backward()
            task_grad = [p.grad.clone() for p in model.parameters()]
            before = [p.detach().clone() for p in model.parameters()]
            si.after_backward(ctx)
            penalised[task] |= any(not torch.equal(p.grad, g) for p, g in zip(model.parameters(), task_grad,
                                                                               strict=True))
            opt.step()
            opt.zero_grad()
            ctx.step += 1
            si.after_step(ctx)
            for o, g, b, p in zip(omega, task_grad, before, model.parameters(), strict=True):
                o -= g * (p.detach() - b)
        want = [(o / ((p.detach() - s) ** 2 + xi)).clamp_min(0) for o, p, s in
                zip(omega, model.parameters(), start, strict=True)]
        got = si.importance(ctx, si.names)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert all(bool((w > 0).any()) for w in want)
        si.after_task(ctx)
    assert penalised == [False, True]
    costs = si.accounting()  # 8 weights: omega, start, gradient, weights in fp32; Omega and anchor in fp32
    assert costs["si_path_bytes"] == 4 * 4 * 8 and costs["si_state_bytes"] == 2 * 4 * 8


def test_si_omega_survives_a_checkpoint_in_the_middle_of_a_task():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ctx = linear_context(model)
    si = SI(SIConfig())
    si.before_task(ctx)
    model(torch.randn(2, 3)).sum().backward()
    si.after_backward(ctx)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    si.after_step(ctx)
    restored = SI(SIConfig())
    restored.load_state_dict(si.state_dict())
    for a, b in zip(restored.importance(ctx, si.names), si.importance(ctx, si.names), strict=True):
        assert torch.equal(a, b) and bool((a > 0).any())


def mas_by_hand(model: torch.nn.Module, examples: list[dict]) -> dict[str, torch.Tensor]:
    """1/N sum_n |d s(x_n)/d theta|, s = mean over target-predicting positions of ||logits||^2: one example,
    one position, one vocabulary entry at a time, with explicit loops."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        logits = model(input_ids=ids).logits[0]
        positions = [t for t in range(len(e["labels"]) - 1) if e["labels"][t + 1] != -100]
        s = sum(sum(logits[t, v] * logits[t, v] for v in range(logits.size(1))) for t in positions) / len(positions)
        grads = torch.autograd.grad(s, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads, strict=True):
            total[n] += g.abs()
    return {n: t / len(examples) for n, t in total.items()}


def test_mas_importance_is_the_mean_absolute_per_example_gradient_of_the_squared_output_norm():
    model = tiny_model(vocab=16)
    ctx = tiny_context(model, tasks=1, n=5)
    for e in ctx.train_sets[0]:  # the tiny tasks use ids up to 47: fold them into the small vocabulary
        e["input_ids"] = [i % 16 for i in e["input_ids"]]
        e["labels"] = [i if i == -100 else i % 16 for i in e["labels"]]
    ctx.train_sets[0][1]["input_ids"] += [3, 4]  # two lengths: the batched pass pads a row
    ctx.train_sets[0][1]["labels"] += [3, 4]
    mas = MAS(MASConfig(mas_samples=5, mas_batch_size=3))
    mas.names = [n for n, _ in model.named_parameters()]
    got = mas.importance(ctx, mas.names)
    want = mas_by_hand(model, ctx.train_sets[0])
    for name, g in zip(mas.names, got, strict=True):
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert float(sum(g.sum() for g in got)) > 0


def test_mas_penalises_after_the_first_task_and_keeps_its_weights_closer_than_none():
    def drift(lam: float) -> float:
        model = tiny_model()
        ctx = tiny_context(model, tasks=2)
        mas = MAS(MASConfig(mas_lambda=lam, mas_samples=8))
        train(ctx, mas, 0)
        anchor = [p.detach().clone() for p in model.parameters()]
        train(ctx, mas, 1)
        return sum(float((p.detach() - a).square().sum()) for p, a in zip(model.parameters(), anchor, strict=True))

    assert drift(10.0) < 0.5 * drift(0.0)


@pytest.mark.parametrize("override,key", [
    ("strategy=si strategy.xi=0", "strategy.xi"),
    ("strategy=si strategy.si_lambda=-1", "strategy.si_lambda"),
    ("strategy=si strategy.gamma=2", "strategy.gamma"),
    ("strategy=mas strategy.mas_samples=0", "strategy.mas_samples"),
    ("strategy=mas strategy.state_dtype=float16", "strategy.state_dtype"),
    ("strategy=mas strategy.penalised_params='[a'", "strategy.penalised_params"),
])
def test_bad_options_are_refused_in_one_line_naming_the_key(override, key):
    with pytest.raises(UserError) as err:
        make_config(*override.split())
    assert key in str(err.value) and "\n" not in str(err.value)
