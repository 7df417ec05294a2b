"""LwF: the distillation term is the tempered KL on target tokens; the teacher is a frozen, separate copy."""

from __future__ import annotations

import contextlib
import functools
import io

import pytest
import torch
from tiny_lm import one_thread, tiny_model  # noqa: F401 (autouse fixture)

from cl_runner.models.lm import causal_lm_loss, collate
from cl_runner.strategies.base import Context
from cl_runner.strategies.distill import distillation_kl
from cl_runner.strategies.lwf import LwF, LwFConfig

VOCAB = 50  # make_ctx draws token ids from 1..49


def make_ctx(model) -> tuple[Context, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    examples = []
    for length in (5, 9, 7):
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "task_id": 0})
    ctx = Context(model=model, device=torch.device("cpu"), autocast=contextlib.nullcontext,
                  collate=functools.partial(collate, pad_id=0), task_names=["a", "b"],
                  train_sets=[examples, examples], batch_size=3)
    return ctx, ctx.collate(examples)


def step(strategy: LwF, ctx: Context, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    outputs = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return strategy.loss(ctx, batch, outputs, causal_lm_loss(outputs.logits, batch["labels"]))


def test_distillation_term_is_the_tempered_kl_on_target_tokens():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 4, 5, -100, -100], [-100, 1, 2, 3, 4, 5]])
    temperature = 2.5
    terms = []
    for b in range(2):
        for t in range(5):  # logits at t predict the label at t + 1
            if labels[b, t + 1] != -100:
                p = torch.softmax(teacher[b, t] / temperature, -1)
                q = torch.softmax(student[b, t] / temperature, -1)
                terms.append((p * (p.log() - q.log())).sum())
    assert len(terms) == 7
    by_hand = torch.stack(terms).mean()
    got = distillation_kl(student, teacher, labels, temperature)
    assert float(got) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(distillation_kl(student, student, labels, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_defaults_to_temperature_one_and_averages_over_target_tokens_only():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(1, 4, 7, generator=g), torch.randn(1, 4, 7, generator=g)
    one_target = torch.tensor([[-100, -100, 3, -100]])  # one target token: predicted by the logits at t = 1
    p, q = torch.softmax(teacher[0, 1], -1), torch.softmax(student[0, 1], -1)
    by_hand = float((p * (p.log() - q.log())).sum())  # T = 1: no tempering
    assert float(distillation_kl(student, teacher, one_target)) == pytest.approx(by_hand, rel=1e-5)
    no_target = torch.full((1, 4), -100)
    assert float(distillation_kl(student, teacher, no_target)) == 0.0  # zero, not 0 / 0


def test_lwf_adds_alpha_t2_kl_and_nothing_before_a_teacher_exists():
    model = tiny_model(vocab=VOCAB)
    ctx, batch = make_ctx(model)
    lwf = LwF(LwFConfig(alpha=0.7, temperature=3.0))
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    base = causal_lm_loss(outputs.logits, batch["labels"])
    assert lwf.loss(ctx, batch, outputs, base) is base  # first task: no teacher
    lwf.after_task(ctx)
    teacher_logits = lwf.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    weight = model.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():  # the student moves away from the teacher (a constant shift would not: LayerNorm)
        weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)))
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    base = causal_lm_loss(outputs.logits, batch["labels"])
    expected = base + 0.7 * 9.0 * distillation_kl(outputs.logits, teacher_logits, batch["labels"], 3.0)
    got = lwf.loss(ctx, batch, outputs, base)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.item() > base.item() + 1e-4
    assert "lwf_kl" in ctx.extras


def test_zero_distillation_when_student_equals_teacher():
    model = tiny_model(vocab=VOCAB)  # eval mode: student and teacher compute the same function
    ctx, batch = make_ctx(model)
    lwf = LwF(LwFConfig(alpha=1.0, temperature=2.0))
    lwf.after_task(ctx)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    base = causal_lm_loss(outputs.logits, batch["labels"])
    assert (lwf.loss(ctx, batch, outputs, base) - base).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_is_frozen_and_unchanged_by_a_training_step():
    model = tiny_model(vocab=VOCAB).train()  # the student trains; its teacher must not
    ctx, batch = make_ctx(model)
    lwf = LwF(LwFConfig(alpha=1.0, temperature=2.0))
    lwf.after_task(ctx)
    teacher = lwf.teacher
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    assert teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight.add_(0.1)  # make the distillation gradient non-zero
    step(lwf, ctx, batch).backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[n], v) for n, v in before.items())
    assert not torch.equal(model.transformer.wte.weight, teacher.transformer.wte.weight)


def test_state_dict_round_trip_rebuilds_the_teacher():
    model = tiny_model(vocab=VOCAB)
    ctx, batch = make_ctx(model)
    lwf = LwF(LwFConfig(alpha=1.0, temperature=2.0))
    lwf.after_task(ctx)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    blob = io.BytesIO()
    torch.save(lwf.state_dict(), blob)
    blob.seek(0)
    resumed = LwF(LwFConfig(alpha=1.0, temperature=2.0))
    resumed.load_state_dict(torch.load(blob, weights_only=False))
    assert step(resumed, ctx, batch).item() == pytest.approx(step(lwf, ctx, batch).item(), rel=1e-6)
    assert resumed.accounting() == lwf.accounting()
    assert lwf.accounting()["teacher_parameters"] == sum(p.numel() for p in model.parameters())
