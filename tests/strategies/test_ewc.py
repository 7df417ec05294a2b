"""EWC / L2: the penalty's shape, its fused gradient, the Fisher estimators, online EWC, and EWC + replay."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import warnings

import pytest
import torch
from tiny_lm import one_thread, tiny_model  # noqa: F401 (autouse fixture)

from cl_runner.models.lm import collate
from cl_runner.strategies import build_strategy
from cl_runner.strategies.anchor import LOG_EVERY
from cl_runner.strategies.base import Context
from cl_runner.strategies.ewc import EWC, L2, EWCConfig, L2Config
from cl_runner.strategies.ewc_replay import EWCReplayConfig
from cl_runner.strategies.fisher import fisher_diagonal, fisher_diagonal_loop

VOCAB = 50  # make_task draws token ids from 1..49


def make_task(task: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(task)
    out = []
    for _ in range(n):
        length = 3 + int(torch.randint(0, 10, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        prompt = 1 + length // 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "task_id": task})
    return out


def make_ctx(model, n_tasks: int = 3, n: int = 12) -> Context:
    return Context(model=model, device=torch.device("cpu"), autocast=contextlib.nullcontext,
                   collate=functools.partial(collate, pad_id=0), task_names=[f"t{i}" for i in range(n_tasks)],
                   train_sets=[make_task(t, n) for t in range(n_tasks)], batch_size=4, seed=0)


def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def by_hand(model, anchors, fishers, lam) -> torch.Tensor:
    """lam/2 * sum_k sum F_k (theta - theta_k)^2 with autograd, straight from the definition."""
    named = dict(model.named_parameters())
    total = sum(((fisher[n] if fisher is not None else 1.0) * (named[n] - anchor[n]) ** 2).sum()
                for anchor, fisher in zip(anchors, fishers, strict=True) for n in anchor)
    return 0.5 * lam * total


def fused_grad(strategy, ctx) -> dict[str, torch.Tensor]:
    ctx.model.zero_grad(set_to_none=True)
    strategy.after_backward(ctx)
    return {n: None if p.grad is None else p.grad.clone() for n, p in ctx.model.named_parameters()}


@pytest.mark.parametrize("mode", ["empirical", "sampled"])
def test_batched_fisher_equals_the_loop(mode):
    # pad_token_id is set, as in the runner's models: HF then checks input_ids for padding (not vmap-able);
    # train mode, so that the Fisher's eval-mode passes have a mode to restore
    model = tiny_model(vocab=VOCAB).train()
    assert model.config.pad_token_id == 0
    ctx = make_ctx(model)
    examples = ctx.train_sets[0][:9]  # lengths 3..12: chunks of 4 are padded, the last chunk is short
    loop = fisher_diagonal_loop(ctx, examples, mode=mode, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the vmap path itself, not its fallback to the loop
        batched = fisher_diagonal(ctx, examples, mode=mode, generator=torch.Generator().manual_seed(5),
                                  batch_size=4)
    assert model.config.pad_token_id == 0  # restored after the pass
    assert loop.keys() == batched.keys() == dict(model.named_parameters()).keys()
    for name in loop:
        torch.testing.assert_close(batched[name], loop[name], rtol=1e-4, atol=1e-9)
    assert sum(float(f.sum()) for f in loop.values()) > 0
    assert model.training  # mode restored after the eval-mode passes
    if mode == "sampled":  # a different seed draws different labels, hence a different Fisher
        other = fisher_diagonal(ctx, examples, mode=mode, generator=torch.Generator().manual_seed(6))
        assert not torch.allclose(other["transformer.wte.weight"], batched["transformer.wte.weight"])


def test_fisher_param_filter():
    ctx = make_ctx(tiny_model(vocab=VOCAB))
    fisher = fisher_diagonal(ctx, ctx.train_sets[0][:4], param_regex=r"h\.1\.mlp")
    assert fisher and all(n.startswith("transformer.h.1.mlp") for n in fisher)


def test_ewc_penalty_is_zero_at_anchor_and_exactly_quadratic():
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    ewc = EWC(EWCConfig(ewc_lambda=50.0, fisher_samples=8, fisher_batch_size=4))
    ewc.after_task(ctx)
    assert ewc.penalty(model) == 0.0
    anchor = snapshot(model)
    perturb(model, 0.01, seed=1)
    delta = {n: p.detach() - anchor[n] for n, p in model.named_parameters()}
    p1 = ewc.penalty(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(anchor[n] + 3.0 * delta[n])
    assert p1 > 0
    assert ewc.penalty(model) == pytest.approx(9.0 * p1, rel=1e-4)


@pytest.mark.parametrize("online", [False, True])
def test_fused_gradient_equals_autograd_of_the_penalty(online):
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    ewc = EWC(EWCConfig(ewc_lambda=7.0, fisher_samples=8, fisher_batch_size=4, online=online, gamma=0.5))
    anchors, fishers = [], []
    for task in range(2):
        ctx.task_index = task
        perturb(model, 0.05, seed=10 + task)
        fishers.append(ewc.estimate_fisher(ctx))
        anchors.append(snapshot(model))
        ewc.after_task(ctx)
    perturb(model, 0.05, seed=99)
    if online:  # one Fisher gamma*F_1 + F_2, anchored at the weights after task 2
        combined = {n: 0.5 * fishers[0][n] + fishers[1][n] for n in fishers[0]}
        anchors, fishers = anchors[1:], [combined]
        for name, f in zip(ewc.names, ewc.fisher, strict=True):
            torch.testing.assert_close(f, combined[name])
    model.zero_grad(set_to_none=True)
    expected = by_hand(model, anchors, fishers, lam=7.0)
    expected.backward()
    expected = expected.item()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    got = fused_grad(ewc, ctx)
    for name in reference:
        scale = float(reference[name].abs().max())  # pre-summing rounds differently from the per-task sum
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-5 * scale)
    # the pre-summed quadratic (with its constant) has the value of the sum of per-task penalties
    assert ewc.penalty(model) == pytest.approx(expected, rel=1e-4)
    assert ctx.extras["ewc_penalty"] == pytest.approx(expected, rel=1e-4)


def test_l2_uses_unit_fisher_over_all_anchors():
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    l2 = build_strategy(L2Config(l2_lambda=3.0, penalised_params=r"^transformer\.h\."))
    assert isinstance(l2, L2)
    anchors = []
    for task in range(3):
        ctx.task_index = task
        perturb(model, 0.05, seed=20 + task)
        anchors.append({n: p for n, p in snapshot(model).items() if n.startswith("transformer.h.")})
        l2.after_task(ctx)
    assert l2.fisher is None  # F = 1 is not stored: the state is one anchor copy
    perturb(model, 0.05, seed=7)
    expected = by_hand(model, anchors, [None] * 3, lam=3.0)
    model.zero_grad(set_to_none=True)
    expected.backward()
    expected = expected.item()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    got = fused_grad(l2, ctx)
    for name in got:
        if name.startswith("transformer.h."):
            scale = float(reference[name].abs().max())
            torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-5 * scale)
        else:  # not selected by the regex: untouched
            assert got[name] is None
    assert l2.penalty(model) == pytest.approx(expected, rel=1e-4)
    assert l2.accounting()["l2_state_bytes"] == 4 * sum(t.numel() for t in anchors[0].values())


def test_bfloat16_state_and_state_dict_round_trip():
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    cfg = EWCConfig(ewc_lambda=5.0, fisher_samples=6, fisher_batch_size=3, state_dtype="bfloat16")
    ewc = EWC(cfg)
    ewc.after_task(ctx)
    assert {t.dtype for t in ewc.anchor + ewc.fisher} == {torch.bfloat16}
    perturb(model, 0.05, seed=3)
    blob = io.BytesIO()
    torch.save(ewc.state_dict(), blob)
    blob.seek(0)
    resumed = EWC(cfg)
    resumed.load_state_dict(torch.load(blob, weights_only=False))
    a, b = fused_grad(ewc, ctx), fused_grad(resumed, ctx)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert resumed.penalty(model) == ewc.penalty(model) > 0


def test_ewc_replay_composes_both_parts():
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    cfg = EWCReplayConfig(ewc_lambda=1.0, fisher_samples=4, buffer_size=5, replay_ratio=0.5)
    strategy = build_strategy(cfg)
    strategy.after_task(ctx)
    assert len(strategy.replay.buffer) == 5 and strategy.ewc.fisher is not None
    ctx.task_index = 1
    batches = list(strategy.train_batches(ctx, [ctx.train_sets[1][:4]]))
    assert len(batches[0]) == 8
    accounting = strategy.accounting()
    assert accounting["buffer_examples"] == 5 and accounting["ewc_state_bytes"] > 0
    assert set(strategy.state_dict()) == {"ewc", "replay"}


def test_nothing_is_penalised_before_the_first_anchor_and_the_model_given_is_measured():
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    ewc = EWC(EWCConfig(ewc_lambda=5.0, fisher_samples=4))
    assert ewc.penalty(model) == 0.0  # the first task trains with no anchor yet
    assert all(g is None for g in fused_grad(ewc, ctx).values()) and "ewc_penalty" not in ctx.extras
    ewc.after_task(ctx)
    other = copy.deepcopy(model)
    perturb(other, 0.05, seed=6)
    assert ewc.penalty(model) == 0.0 < ewc.penalty(other)  # the parameters of the model passed, not a cached one


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_ewc_lambda_one_applies_the_penalty_and_zero_switches_it_off(lam):
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    ewc = EWC(EWCConfig(ewc_lambda=lam, fisher_samples=8, fisher_batch_size=4))
    fisher, anchor = ewc.estimate_fisher(ctx), snapshot(model)
    ewc.after_task(ctx)
    perturb(model, 0.05, seed=4)
    got = fused_grad(ewc, ctx)  # ctx.step = 0: a step that logs the penalty
    if lam == 0:
        assert all(g is None for g in got.values()) and "ewc_penalty" not in ctx.extras
        return
    model.zero_grad(set_to_none=True)
    expected = by_hand(model, [anchor], [fisher], lam=1.0)
    expected.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6 * float(p.grad.abs().max()))
    assert expected.item() > 0
    assert ewc.penalty(model) == ctx.extras["ewc_penalty"] == pytest.approx(expected.item(), rel=1e-4)


def test_penalty_is_logged_every_log_every_steps_only():
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    l2 = L2(L2Config(l2_lambda=2.0))
    l2.after_task(ctx)
    perturb(model, 0.05, seed=5)
    logged = []
    for step in range(2 * LOG_EVERY + 1):
        ctx.step, ctx.extras = step, {}
        l2.after_backward(ctx)
        if "l2_penalty" in ctx.extras:
            logged.append(step)
            assert ctx.extras["l2_penalty"] == pytest.approx(l2.penalty(model)) and l2.penalty(model) > 0
    assert logged == [0, LOG_EVERY, 2 * LOG_EVERY]


@pytest.mark.parametrize(("state_dtype", "size"), [("float32", 4), ("bfloat16", 2)])
def test_accounting_counts_the_penalised_parameters_and_their_state(state_dtype, size):
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    n = sum(p.numel() for name, p in model.named_parameters() if name.startswith("transformer.h.1.mlp."))
    ewc = EWC(EWCConfig(penalised_params=r"h\.1\.mlp", fisher_samples=4, state_dtype=state_dtype))
    assert ewc.accounting() == {"ewc_state_bytes": 0, "ewc_parameters": 0}  # nothing anchored yet
    for task in range(2):  # the state stays one anchor and one Fisher, whatever the number of tasks
        ctx.task_index = task
        perturb(model, 0.05, seed=30 + task)
        ewc.after_task(ctx)
        assert ewc.accounting() == {"ewc_state_bytes": 2 * size * n, "ewc_parameters": n}
    l2 = L2(L2Config(penalised_params=r"h\.1\.mlp", state_dtype=state_dtype))
    l2.after_task(ctx)
    assert l2.accounting() == {"l2_state_bytes": size * n, "l2_parameters": n}


def test_a_checkpoint_taken_before_the_first_anchor_resumes():
    cfg = EWCConfig(ewc_lambda=2.0, fisher_samples=4)
    fresh = EWC(cfg).state_dict()  # a checkpoint during the first task
    assert fresh == {"names": None, "anchor": None, "fisher": None, "weight": 0.0, "const": 0.0}
    resumed = EWC(cfg)
    resumed.load_state_dict(fresh)
    model = tiny_model(vocab=VOCAB)
    assert resumed.penalty(model) == 0.0 and resumed.accounting() == {"ewc_state_bytes": 0, "ewc_parameters": 0}


def test_the_state_follows_the_model_to_its_device():
    # "meta" stands in for an accelerator: a checkpoint's state (on the CPU) moves to wherever the model is
    model = tiny_model(vocab=VOCAB)
    ctx = make_ctx(model)
    cfg = EWCConfig(ewc_lambda=2.0, fisher_samples=4)
    ewc = EWC(cfg)
    ewc.after_task(ctx)
    resumed = EWC(cfg)
    resumed.load_state_dict(ewc.state_dict())
    model.to("meta")
    ctx.step = 1  # not a logging step: a value on "meta" cannot be read
    resumed.after_backward(ctx)
    assert len(resumed.anchor) == len(resumed.fisher) == len(resumed.names) > 1
    assert {t.device.type for t in resumed.anchor + resumed.fisher} == {"meta"}
