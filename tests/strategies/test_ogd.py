"""OGD (cl_runner/strategies/ogd.py): the projection and Gram-Schmidt on hand-made vectors, the stored directions on a
tiny model against autograd, a projected step that leaves the old examples' outputs unchanged to first order, the
memory cap, an exact save/restore, and a short run."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_config, run_quietly
from tiny_lm import one_thread, tiny_context, tiny_model, train  # noqa: F401 (autouse fixture)

from cl_runner.core.errors import ConfigError
from cl_runner.strategies.base import trainable_parameters
from cl_runner.strategies.ogd import (
    DEPENDENT,
    OGD,
    OGDConfig,
    ground_truth_logits,
    orthonormalise,
    project_out_,
)

R2 = 1 / math.sqrt(2)


def split(vector: list[float]) -> list[torch.Tensor]:
    """A vector of R^5 as two 'parameters' of 2 and 3 elements (a basis is one block per parameter)."""
    t = torch.tensor(vector, dtype=torch.float32)
    return [t[:2].clone(), t[2:].clone()]


def blocks(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.stack([split(r)[k] for r in rows]) for k in range(2)] if rows else [torch.empty(0, 2),
                                                                                        torch.empty(0, 3)]


def joined(vector: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in vector])


def test_the_projection_removes_exactly_the_basis_components():
    basis = blocks([1, 0, 0, 0, 0], [0, R2, R2, 0, 0])  # e1 and (e2 + e3)/sqrt 2, across both parameters
    g = split([1, 2, 0, 3, -1])
    dots = project_out_(basis, g)
    torch.testing.assert_close(dots, torch.tensor([1.0, 2 * R2]))
    torch.testing.assert_close(joined(g), torch.tensor([0.0, 1.0, -1.0, 3.0, -1.0]))  # g - 1 e1 - sqrt2 (e2+e3)/sqrt2
    for row in ([1, 0, 0, 0, 0], [0, R2, R2, 0, 0]):
        assert abs(float(joined(g) @ torch.tensor(row, dtype=torch.float32))) < 1e-6  # orthogonal to the basis


def test_a_gradient_already_orthogonal_is_left_unchanged_and_both_signs_of_a_small_overlap_are_removed():
    basis = blocks([1, 0, 0, 0, 0], [0, R2, R2, 0, 0])
    g = split([0, 1, -1, 5, 2])
    project_out_(basis, g)
    assert torch.equal(joined(g), torch.tensor([0.0, 1.0, -1.0, 5.0, 2.0]))
    for eps in (1e-3, -1e-3):  # unlike A-GEM (which keeps g when g.r >= 0), OGD removes any overlap
        g = split([eps, 0, 0, 5, 2])
        project_out_(basis, g)
        torch.testing.assert_close(joined(g), torch.tensor([0.0, 0.0, 0.0, 5.0, 2.0]))


def test_gram_schmidt_makes_an_orthonormal_basis_and_drops_what_it_already_spans():
    assert orthonormalise(blocks(), split([0, 0, 0, 0, 0])) is None  # a zero gradient adds nothing
    first = orthonormalise(blocks(), split([3, 0, 4, 0, 0]))
    torch.testing.assert_close(joined(first), torch.tensor([0.6, 0.0, 0.8, 0.0, 0.0]))
    basis = [f[None] for f in first]
    second = orthonormalise(basis, split([3, 1, 4, 0, 0]))  # = 5 * first + e2: what is left is e2
    torch.testing.assert_close(joined(second), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    basis = [torch.cat([b, s[None]]) for b, s in zip(basis, second, strict=True)]
    assert orthonormalise(basis, split([6, -2, 8, 0, 0])) is None  # 10 first - 2 second: spanned
    almost = split([6, -2, 8, 0, 0.5 * DEPENDENT * math.sqrt(104)])  # what is left: below DEPENDENT of the norm
    assert orthonormalise(basis, almost) is None

    torch.manual_seed(0)  # many random directions of R^5000: the result stays orthonormal to float precision
    vectors = [[torch.randn(2000), torch.randn(3000)] for _ in range(60)]
    basis = [torch.empty(0, 2000), torch.empty(0, 3000)]
    for v in vectors:
        made = orthonormalise(basis, v)
        basis = [torch.cat([b, m[None]]) for b, m in zip(basis, made, strict=True)]
    matrix = torch.cat(basis, dim=1)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(60), atol=1e-5, rtol=0)


def gtl_gradient(model: torch.nn.Module, ctx, example) -> torch.Tensor:
    """The gradient of the summed ground-truth logits of one example, by plain autograd, flattened."""
    batch = ctx.collate([example])
    model.zero_grad()
    ground_truth_logits(model(input_ids=batch["input_ids"]).logits, batch, [example]).backward()
    out = torch.cat([p.grad.reshape(-1) for _, p in trainable_parameters(model)])
    model.zero_grad()
    return out


def basis_matrix(strategy: OGD) -> torch.Tensor:
    return torch.cat(strategy.blocks, dim=1)


def test_after_a_task_the_basis_spans_its_examples_ground_truth_logit_gradients_orthonormally():
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=3, n=8), OGD(OGDConfig(directions_per_task=5))
    train(ctx, strategy, 0, epochs=1)
    b = basis_matrix(strategy)
    assert b.shape == (5, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(b @ b.T, torch.eye(5), atol=1e-5, rtol=0)
    drawn = torch.randperm(8, generator=ctx.generator(71, task=0))[:5].tolist()  # SAMPLE_SALT, task 0
    first = gtl_gradient(model, ctx, ctx.train_sets[0][drawn[0]])
    torch.testing.assert_close(b[0], first / first.norm(), atol=1e-5, rtol=1e-4)  # Gram-Schmidt's first row
    for i in drawn:  # every drawn example's gradient lies in the span
        g = gtl_gradient(model, ctx, ctx.train_sets[0][i])
        assert float((g - b.T @ (b @ g)).norm()) < 1e-4 * float(g.norm())
    other = next(i for i in range(8) if i not in drawn)
    g = gtl_gradient(model, ctx, ctx.train_sets[0][other])
    assert float((g - b.T @ (b @ g)).norm()) > 1e-2 * float(g.norm())  # not drawn: not in the span (measured 4%)

    train(ctx, strategy, 1, epochs=1)  # task 2's directions join the same orthonormal basis
    b = basis_matrix(strategy)
    assert b.shape[0] == 10 and strategy.kept == {"t0": 5, "t1": 5}
    torch.testing.assert_close(b @ b.T, torch.eye(10), atol=1e-5, rtol=0)
    train(ctx, strategy, 2, epochs=1)
    assert basis_matrix(strategy).shape[0] == 10  # the last task stores nothing: no later step would use it


def test_directions_are_taken_in_eval_mode_and_the_training_mode_is_kept():
    model = tiny_model()
    model.config.resid_pdrop = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5  # dropout on: a gradient in training mode would be a random one
    ctx, strategy = tiny_context(model, tasks=2, n=8), OGD(OGDConfig(directions_per_task=1))
    model.train()
    strategy.after_task(ctx)
    assert model.training
    model.eval()
    first = gtl_gradient(model, ctx, ctx.train_sets[0][torch.randperm(8, generator=ctx.generator(71))[0]])
    torch.testing.assert_close(basis_matrix(strategy)[0], first / first.norm(), atol=1e-5, rtol=1e-4)


def test_the_projected_step_leaves_the_stored_examples_outputs_unchanged_to_first_order():
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=2, n=8), OGD(OGDConfig(directions_per_task=8))
    train(ctx, strategy, 0, epochs=1)
    ctx.task_index = 1
    batch = ctx.collate(ctx.train_sets[1])
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(input_ids=batch["input_ids"]).logits[:, :-1].transpose(1, 2),
                                      batch["labels"][:, 1:]).backward()
    naive = [p.grad.clone() for _, p in trainable_parameters(model)]
    strategy.after_backward(ctx)
    projected = [p.grad.clone() for _, p in trainable_parameters(model)]
    flat = torch.cat([g.reshape(-1) for g in projected])
    assert float((basis_matrix(strategy) @ flat).abs().max()) < 1e-5 * float(flat.norm())
    assert float(ctx.extras["ogd_removed"]) > 0.01  # the tasks interfere: something was removed

    def old_outputs() -> torch.Tensor:
        """Each old example's summed ground-truth logits: the output its direction keeps (one per example)."""
        with torch.no_grad():
            old = ctx.collate(ctx.train_sets[0])
            logits = model(input_ids=old["input_ids"]).logits[:, :-1]
            picked = logits.gather(-1, old["labels"][:, 1:].clamp_min(0)[..., None]).squeeze(-1)
            return (picked * (old["labels"][:, 1:] != -100)).sum(-1)

    def change_after_step(step: list[torch.Tensor], lr: float = 1e-3) -> float:
        start = old_outputs()
        params = [p for _, p in trainable_parameters(model)]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, step, strict=True):
                p.sub_(lr * g / float(torch.cat([s.reshape(-1) for s in step]).norm()))  # steps of one length
        moved = float((old_outputs() - start).abs().max())
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        return moved

    assert change_after_step(projected) < 0.05 * change_after_step(naive)  # measured 7e-4: second order only


def test_the_memory_cap_shares_directions_equally_and_a_cap_below_one_per_task_is_refused():
    model = tiny_model()
    one = sum(p.numel() for p in model.parameters()) * 4 / 2**20  # MiB of one float32 direction
    ctx = tiny_context(model, tasks=3, n=8)
    strategy = OGD(OGDConfig(max_basis_mb=one * 6.5))  # 6 directions: 3 per earlier task
    strategy.check(ctx)
    train(ctx, strategy, 0, epochs=1)
    assert strategy.kept == {"t0": 3}
    half = OGD(OGDConfig(max_basis_mb=one * 6.5, state_dtype="bfloat16"))  # 13 bfloat16 directions: 6 per task
    assert half.share(ctx)[1] == 6
    with pytest.raises(ConfigError, match=r"^strategy\.max_basis_mb: one OGD direction of this model is .* MiB") as err:
        OGD(OGDConfig(max_basis_mb=one * 1.5)).check(ctx)  # 1 direction for 2 earlier tasks
    assert "\n" not in str(err.value)


def test_save_and_restore_give_the_same_projection():
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=3, n=8), OGD(OGDConfig(directions_per_task=4, direction="nll",
                                                                          state_dtype="bfloat16"))
    train(ctx, strategy, 0, epochs=1)
    restored = OGD(OGDConfig(directions_per_task=4, direction="nll", state_dtype="bfloat16"))
    state = strategy.state_dict()
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert restored.accounting() == strategy.accounting()
    ctx.task_index = 1
    grads = []
    for s in (strategy, restored):
        for k, (_, p) in enumerate(trainable_parameters(model)):
            p.grad = torch.full_like(p, 0.01 * (k + 1))
        s.after_backward(ctx)
        grads.append([p.grad.clone() for _, p in trainable_parameters(model)])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert restored.blocks[0].dtype == torch.bfloat16


def test_bad_options_are_reported_one_line_each():
    cfg = OGDConfig(directions_per_task=0, max_basis_mb=-1.0, direction="loss", state_dtype="float16")
    errors = cfg.errors("strategy")
    assert [e.split(":")[0] for e in errors] == ["strategy.directions_per_task", "strategy.max_basis_mb",
                                                 "strategy.direction", "strategy.state_dtype"]
    with pytest.raises(ConfigError, match=r"strategy\.direction: expected one of logit, nll, got 'loss'"):
        make_config("strategy=ogd", "strategy.direction=loss")


@pytest.mark.slow
def test_a_short_run_reports_the_basis_in_its_accounting(tmp_path):
    result = run_quietly(make_config("strategy=ogd", "train.epochs=2", "strategy.directions_per_task=16"),
                         tmp_path / "run")
    accounting = result["strategy_accounting"]
    assert result["status"] == "completed"
    assert accounting["ogd_directions_per_task"] == {"color": 16, "city": 16}  # not the last task (food)
    assert accounting["ogd_directions"] == 32 and accounting["ogd_projected_steps"] > 0
    assert accounting["ogd_basis_bytes"] == 32 * accounting["ogd_bytes_per_direction"]
