"""A-GEM and GEM (cl_runner/strategies/gem.py): the projection and the dual QP against hand and brute-force
answers, the reference gradient against plain autograd, the hook on a tiny model, the refusals; on an
encoder-decoder (tiny_t5): the reference gradient against Hugging Face's own loss, both projections, training."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_lm import one_thread, train  # noqa: F401 (autouse fixture)
from tiny_loop import context, examples, tiny_model
from tiny_t5 import hf_mean_nll, split, t5_context, task_perplexity, tiny_t5

from cl_runner.core.errors import ConfigError
from cl_runner.models.lm import causal_lm_loss, collate
from cl_runner.strategies.gem import (
    AGEM,
    GEM,
    RIDGE,
    AGEMConfig,
    GEMConfig,
    agem_project,
    examples_gradient,
    gem_dual,
)


def test_agem_projects_a_conflicting_gradient_onto_the_reference_plane_and_leaves_an_agreeing_one():
    g, r = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g.r = -1, r.r = 2: g - (-1/2) r
    torch.testing.assert_close(agem_project(g, r), torch.tensor([0.5, 0.5]))
    assert float(torch.dot(agem_project(g, r), r)) == pytest.approx(0.0)
    agreeing = torch.tensor([1.0, 2.0])  # g.r = 1 > 0
    assert torch.equal(agem_project(agreeing, r), agreeing)


def brute_force_dual(gram: torch.Tensor, dots: torch.Tensor, margin: float) -> torch.Tensor:
    """Every choice of free coordinates: solve the equality system on them, keep the feasible point of least
    objective (the minimiser of a convex QP over a box is one of these)."""
    a, b, t = gram.double() + RIDGE * torch.eye(len(dots), dtype=torch.float64), dots.double(), len(dots)
    best, best_value = None, float("inf")
    for free in itertools.chain.from_iterable(itertools.combinations(range(t), k) for k in range(t + 1)):
        v = torch.full((t,), float(margin), dtype=torch.float64)
        if free:
            idx = list(free)
            fixed = [k for k in range(t) if k not in free]
            rhs = -(b[idx] + a[idx][:, fixed] @ v[fixed]) if fixed else -b[idx]
            v[idx] = torch.linalg.solve(a[idx][:, idx], rhs)
        if (v >= margin - 1e-12).all():
            value = float(0.5 * v @ a @ v + b @ v)
            if value < best_value:
                best, best_value = v, value
    return best


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_gem_dual_matches_brute_force_and_its_projection_satisfies_every_constraint(margin):
    torch.manual_seed(0)
    for _ in range(5):
        refs = torch.randn(4, 7, dtype=torch.float64)  # 4 earlier tasks, 7 parameters
        g = torch.randn(7, dtype=torch.float64) - refs.sum(0)  # mostly conflicting
        gram, dots = refs @ refs.T, refs @ g
        v = gem_dual(gram, dots, margin)
        torch.testing.assert_close(v, brute_force_dual(gram, dots, margin), atol=1e-9, rtol=1e-9)
        z = g + refs.T @ v
        assert (refs @ z >= -RIDGE * v - 1e-9).all()  # G z >= 0 up to the ridge's pull


def test_gem_dual_on_a_hand_case():
    # one earlier task, g = (1, 0), g_1 = (-1, 1): v = -(g.g_1) / (g_1.g_1 + ridge) = 1 / (2 + ridge)
    refs, g = torch.tensor([[-1.0, 1.0]]), torch.tensor([1.0, 0.0])
    v = gem_dual(refs @ refs.T, refs @ g)
    assert float(v[0]) == pytest.approx(1 / (2 + RIDGE))
    # two conflicting tasks, orthogonal: each gets its own A-GEM coefficient
    refs, g = torch.tensor([[-1.0, 0.0, 1.0], [0.0, -1.0, 0.0]]), torch.tensor([1.0, 1.0, 0.0])
    v = gem_dual(refs @ refs.T, refs @ g)
    torch.testing.assert_close(v, torch.tensor([1 / (2 + RIDGE), 1 / (1 + RIDGE)], dtype=torch.float64))


def test_reference_gradient_is_the_mean_target_nll_gradient_whatever_the_chunks_and_leaves_grad_alone():
    model, data = tiny_model(), examples(6)
    ctx = context(model, data)
    model.zero_grad()
    causal_lm_loss(model(**{k: v for k, v in collate(data, 0).items() if k in ("input_ids", "attention_mask")}
                         ).logits, collate(data, 0)["labels"]).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, m in zip(model.parameters(), marker, strict=True):
        p.grad = m
    for chunk in (1, 4, 6):
        got = examples_gradient(ctx, data, chunk)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(p.grad is m for p, m in zip(model.parameters(), marker, strict=True))


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def test_agem_hook_replaces_the_step_gradient_by_its_projection():
    model, data = tiny_model(), examples(8)
    ctx = context(model, [data])
    ctx.task_names, ctx.train_sets = ["a", "b"], [data[:4], data[4:]]
    agem = AGEM(AGEMConfig(ref_batch_size=4, buffer_size=4))
    agem.after_task(ctx)  # the buffer holds task a's 4 examples: the draw is all of them
    ctx.task_index = 1
    torch.manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    g = flat(p.grad for p in model.parameters()).clone()
    ref = flat(examples_gradient(ctx, data[:4], 4))
    g = -g if torch.dot(g, ref) > 0 else g  # make it conflict
    for p, part in zip(model.parameters(), torch.split(g, [p.numel() for p in model.parameters()]), strict=True):
        p.grad = part.view_as(p).clone()
    agem.after_backward(ctx)
    got = flat(p.grad for p in model.parameters())
    torch.testing.assert_close(got, agem_project(g, ref), atol=1e-6, rtol=1e-5)
    assert float(torch.dot(got, ref)) == pytest.approx(0.0, abs=1e-4) and agem.changed == 1


def test_gem_refuses_a_sequence_above_max_tasks_in_one_line():
    model, data = tiny_model(), examples(4)
    ctx = context(model, data)
    ctx.task_names = ["a", "b", "c"]
    GEM(GEMConfig(max_tasks=3)).check(ctx)
    with pytest.raises(ConfigError, match=r"^strategy.max_tasks: .*3 tasks, above max_tasks=2") as err:
        GEM(GEMConfig(max_tasks=2)).check(ctx)
    assert "\n" not in str(err.value)


def test_bad_options_are_reported_one_line_each():
    assert GEMConfig(margin=-1.0, max_tasks=0, ref_batch_size=0, reference="some").errors("strategy") == [
        "strategy.ref_batch_size: expected a positive number, got 0",
        "strategy.reference: expected one of memory, sampled, got 'some'",
        "strategy.margin: expected a non-negative number, got -1.0",
        "strategy.max_tasks: expected a positive number, got 0"]
    assert AGEMConfig(sampling="newest").errors("strategy")[0].startswith("strategy.sampling: expected one of")


def set_gradient(model: torch.nn.Module, g: torch.Tensor) -> None:
    sizes = [p.numel() for p in model.parameters()]
    for p, part in zip(model.parameters(), torch.split(g, sizes), strict=True):
        p.grad = part.view_as(p).clone()


def test_on_an_encoder_decoder_the_reference_gradient_is_hugging_faces_and_agem_projects():
    """tiny_t5: the reference gradient is that of Hugging Face's own loss over the examples' target tokens (each
    example fed alone), A-GEM projects a conflicting step gradient onto it, and two tasks train through the loop."""
    model = tiny_t5()
    ctx = t5_context(model, tasks=2, n=4)
    data = ctx.train_sets[0]
    total = sum(len(split(e)[1]) for e in data)
    sum(hf_mean_nll(model, e) * len(split(e)[1]) / total for e in data).backward()
    expected = flat(p.grad for p in model.parameters())
    model.zero_grad(set_to_none=True)
    ref = flat(examples_gradient(ctx, data, 3))  # chunks of 3 and 1, padded: the same gradient
    torch.testing.assert_close(ref, expected, atol=1e-6, rtol=1e-4)
    agem = AGEM(AGEMConfig(ref_batch_size=4, buffer_size=4))
    agem.after_task(ctx)  # the buffer holds task 0's 4 examples: the draw is all of them
    ctx.task_index = 1
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    g = g - 2 * torch.dot(g, ref) / torch.dot(ref, ref) * ref if torch.dot(g, ref) > 0 else g  # make it conflict
    set_gradient(model, g)
    agem.after_backward(ctx)
    got = flat(p.grad for p in model.parameters())
    torch.testing.assert_close(got, agem_project(g, ref), atol=1e-6, rtol=1e-5)
    assert float(torch.dot(got, ref)) == pytest.approx(0.0, abs=1e-4) and agem.changed == 1
    model.zero_grad(set_to_none=True)
    before = task_perplexity(ctx, 1)
    train(ctx, agem, 1, epochs=3)
    assert agem.steps > 1 and task_perplexity(ctx, 1) < before


def test_on_an_encoder_decoder_gem_projects_against_every_earlier_tasks_reference():
    """tiny_t5, task 2 after tasks 0 and 1: a step gradient that conflicts with both references comes out
    agreeing with both (up to the ridge), and the task trains through the loop."""
    model = tiny_t5()
    ctx = t5_context(model, tasks=3, n=4)
    gem = GEM(GEMConfig(ref_batch_size=4, buffer_size=8, margin=0.0))
    for task in range(2):
        ctx.task_index = task
        gem.after_task(ctx)  # 4 examples of each task: each draw is all of its task's
    ctx.task_index = 2
    refs = torch.stack([flat(examples_gradient(ctx, ctx.train_sets[t], 4)) for t in range(2)])
    g = torch.randn(refs.shape[1], generator=torch.Generator().manual_seed(5)) * 0.01 - refs[0] - 0.5 * refs[1]
    assert (refs @ g < 0).all()
    set_gradient(model, g)
    gem.after_backward(ctx)
    got = flat(p.grad for p in model.parameters())
    v = gem_dual(refs @ refs.T, refs @ g).float()
    assert gem.changed == 1 and (v > 0).all()
    torch.testing.assert_close(got, g + refs.T @ v, atol=1e-4, rtol=1e-4)  # refs in other chunks: rounding
    assert (refs @ got >= -RIDGE * v - 1e-4).all()  # agrees with both, up to the ridge's pull
    model.zero_grad(set_to_none=True)
    before = task_perplexity(ctx, 2)
    train(ctx, gem, 2, epochs=3)
    assert gem.steps > 1 and task_perplexity(ctx, 2) < before


def test_agem_leaves_a_gradient_whose_dot_with_the_reference_is_small_but_positive():
    """0 < g.r < 1: no projection (a rule ``g.r < 1`` would project here), in the function and in the hook."""
    g, r = torch.tensor([0.5, 3.0]), torch.tensor([1.0, 0.0])  # g.r = 0.5
    assert torch.equal(agem_project(g, r), g)
    model, data = tiny_model(), examples(8)
    ctx = context(model, data)
    ctx.task_names, ctx.train_sets = ["a", "b"], [data[:4], data[4:]]
    agem = AGEM(AGEMConfig(ref_batch_size=4, buffer_size=4))
    agem.after_task(ctx)
    ctx.task_index = 1
    ref = flat(examples_gradient(ctx, data[:4], 4))
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    g = g - (torch.dot(g, ref) - 0.5) / torch.dot(ref, ref) * ref  # g.r = 0.5
    assert 0.4 < float(torch.dot(g, ref)) < 0.6
    set_gradient(model, g)
    agem.after_backward(ctx)
    assert torch.equal(flat(p.grad for p in model.parameters()), g)
    assert agem.changed == 0 and agem.steps == 1 and float(ctx.extras["agem_projected"]) == 0.0


def test_gem_dual_runs_sweeps_until_no_coordinate_moves_and_stops_there():
    """Strongly correlated constraints: one sweep is far from the minimiser, several reach it; the solve stops
    at the first sweep that moves no coordinate by more than tol (the sweep before still moved more)."""
    refs = torch.tensor([[1.0, 0.0, 0.0], [0.95, 0.3, 0.0], [0.9, 0.1, 0.4]], dtype=torch.float64)
    g = torch.tensor([-1.0, -0.2, 0.3], dtype=torch.float64)
    gram, dots = refs @ refs.T, refs @ g
    want = brute_force_dual(gram, dots, 0.0)
    info: dict = {}
    v = gem_dual(gram, dots, 0.0, info=info)
    torch.testing.assert_close(v, want, atol=1e-9, rtol=1e-9)
    assert 3 <= info["sweeps"] < 10_000 and info["moved"] <= 1e-12 * max(1.0, float(v.abs().max()))
    assert float((gem_dual(gram, dots, 0.0, max_sweeps=1) - want).abs().max()) > 1e-2  # one sweep is not enough
    early: dict = {}
    v_early = gem_dual(gram, dots, 0.0, max_sweeps=info["sweeps"] - 1, info=early)
    assert early["sweeps"] == info["sweeps"] - 1 and early["moved"] > 1e-12 * max(1.0, float(v_early.abs().max()))


@pytest.mark.parametrize("reference", ["memory", "sampled"])
def test_gem_constrains_on_each_earlier_tasks_whole_memory_by_default(reference):
    """Tasks of 6 buffered examples, ref_batch_size 2, chunks of 4: by default each reference gradient is its task's
    whole memory (chunked), and the step gradient is GEM's projection on them; ``sampled`` uses 2 drawn examples."""
    model, data = tiny_model(), examples(18)
    ctx = context(model, data)
    ctx.task_names, ctx.train_sets = ["a", "b", "c"], [data[:6], data[6:12], data[12:]]
    gem = GEM(GEMConfig(buffer_size=12, ref_batch_size=2, margin=0.0, reference=reference))
    for task in range(2):
        ctx.task_index = task
        gem.after_task(ctx)
    ctx.task_index, gem.chunk = 2, 4
    assert gem.buffer.counts() == {0: 6, 1: 6}
    refs = torch.stack([flat(examples_gradient(ctx, ctx.train_sets[t], 6)) for t in range(2)])
    g = torch.randn(refs.shape[1], generator=torch.Generator().manual_seed(5)) * 0.01 - refs[0] - 0.5 * refs[1]
    set_gradient(model, g)
    gem.after_backward(ctx)
    got = flat(p.grad for p in model.parameters())
    want = g + refs.T @ gem_dual(refs @ refs.T, refs @ g).float()
    if reference == "memory":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    else:
        assert float((got - want).abs().max()) > 1e-3  # 2 of 6 examples: another constraint
    assert gem.changed == 1


def test_gem_leaves_a_gradient_that_agrees_with_every_task_even_slightly():
    """0 < g.g_k < 1 for every earlier task: no projection (a rule ``g.g_k < 1`` would project here)."""
    model, data = tiny_model(), examples(8)
    ctx = context(model, data)
    ctx.task_names, ctx.train_sets = ["a", "b"], [data[:4], data[4:]]
    gem = GEM(GEMConfig(buffer_size=4))
    gem.after_task(ctx)
    ctx.task_index = 1
    ref = flat(examples_gradient(ctx, data[:4], 4))
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6))
    g = g - (torch.dot(g, ref) - 0.5) / torch.dot(ref, ref) * ref  # g.g_1 = 0.5
    set_gradient(model, g)
    gem.after_backward(ctx)
    assert torch.equal(flat(p.grad for p in model.parameters()), g)
    assert gem.changed == 0 and gem.steps == 1 and float(ctx.extras["gem_projected"]) == 0.0
