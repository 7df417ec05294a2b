"""DER / DER++ (cl_runner/strategies/der.py): the logit distances against hand computations, the stored logits
against the model's at insertion, the step's extra gradient against autograd on the loss written out by hand; the
same on an encoder-decoder (tiny_t5), against Hugging Face's own forward of each example."""

from __future__ import annotations

import copy
import io
import math
from functools import partial

import pytest
import torch
from tiny_lm import one_thread, train  # noqa: F401 (autouse fixture)
from tiny_loop import context, examples, tiny_model
from tiny_t5 import hf_target_logits, split, t5_context, task_perplexity, tiny_t5

from cl_runner.config.schema import TrainConfig
from cl_runner.engine.loop import TaskRun, train_task
from cl_runner.models.lm import collate, pack
from cl_runner.strategies.der import DER, ID, DERConfig, example_rows, logit_distance

STUDENT = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
STORED = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 1.0]])


def test_mse_is_the_mean_squared_logit_difference_per_position():
    assert logit_distance(STUDENT, STORED, None, "mse").tolist() == pytest.approx([(1 + 4 + 1) / 3,
                                                                                  (0.25 + 1 + 4) / 3])
    index = torch.tensor([[0, 2], [2, 1]])  # top-2 stored: values at these vocabulary entries
    values = torch.tensor([[2.0, 1.0], [1.0, 0.0]])
    assert logit_distance(STUDENT, values, index, "mse").tolist() == pytest.approx([(1 + 1) / 2, (4 + 1) / 2])


def kl_by_hand(p_logits: list[float], q_logits: list[float]) -> float:
    zp, zq = sum(math.exp(x) for x in p_logits), sum(math.exp(x) for x in q_logits)
    return sum(math.exp(a) / zp * (a - math.log(zp) - b + math.log(zq)) for a, b in zip(p_logits, q_logits,
                                                                                         strict=True))


def test_kl_is_stored_against_now_over_the_vocabulary_or_renormalised_on_the_top_k():
    got = logit_distance(STUDENT, STORED, None, "kl").tolist()
    assert got == pytest.approx([kl_by_hand([2, 0, 1], [1, 2, 0]), kl_by_hand([0, 0, 1], [0.5, -1, 3])])
    index, values = torch.tensor([[0, 2]]), torch.tensor([[2.0, 1.0]])
    assert logit_distance(STUDENT[:1], values, index, "kl").tolist() == pytest.approx([kl_by_hand([2, 1], [1, 0])])


def der_after_first_task(cfg: DERConfig, n: int = 6):
    model, data = tiny_model(), examples(2 * n)
    ctx = context(model, data)
    ctx.task_names, ctx.train_sets = ["a", "b"], [data[:n], data[n:]]
    der = DER(cfg)
    der.after_task(ctx)
    ctx.task_index = 1
    return der, ctx, model


def model_logits(model, example):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
    return logits[torch.tensor(example["labels"][1:]) != -100]


@pytest.mark.parametrize("top_k", [None, 5])
def test_the_buffer_stores_the_models_logits_on_the_target_positions_at_insertion(top_k):
    der, _, model = der_after_first_task(DERConfig(buffer_size=4, top_k=top_k, insertion="task_end"))
    assert len(der.buffer) == 4 and set(der.logits) == {e[ID] for e in der.buffer.examples}
    for example in der.buffer.examples:
        values, index = der.logits[example[ID]]
        want = model_logits(model, example)
        if top_k is None:
            assert index is None and values.dtype == torch.float16
            torch.testing.assert_close(values, want.half())
        else:
            top = want.topk(top_k, dim=-1)
            assert torch.equal(index.long(), top.indices) and index.dtype == torch.int32
            torch.testing.assert_close(values, top.values.half())
    bytes_per_position = 40 * 2 if top_k is None else 5 * (2 + 4)  # vocabulary 40, fp16 (+ int32 indices)
    assert der.accounting()["der_logit_bytes_per_position"] == bytes_per_position


@pytest.mark.parametrize(("distance", "beta"), [("mse", 0.0), ("mse", 0.7), ("kl", 0.7)])
def test_the_step_gets_the_gradient_of_the_der_loss_written_out_by_hand(distance, beta):
    cfg = DERConfig(buffer_size=6, replay_batch_size=6, alpha=0.3, beta=beta, distance=distance, insertion="task_end")
    der, ctx, model = der_after_first_task(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1.5)  # the model moved on since insertion
    buffer = der.buffer.examples  # the draw of 6 out of 6: all of them, in some order (a mean: any order)
    batch = collate(buffer, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    now = logits[:, :-1][mask]
    stored = torch.cat([der.logits[e[ID]][0] for e in buffer]).float()
    if distance == "mse":
        d = ((now - stored) ** 2).mean(-1)
    else:
        p = torch.softmax(stored, -1)
        d = (p * (p.log() - torch.log_softmax(now, -1))).sum(-1)
    nll = -torch.log_softmax(now, -1).gather(1, batch["labels"][:, 1:][mask][:, None]).squeeze(1)
    (0.3 * d.mean() + beta * nll.mean()).backward()
    want = [p.grad.clone() + 1.0 for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # the step's own gradient: DER adds to it
    der.after_backward(ctx)
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-4)


def test_bad_options_are_reported_one_line_each():
    errs = DERConfig(alpha=-1.0, top_k=0, distance="l1", logit_dtype="int8").errors("strategy")
    assert errs == ["strategy.top_k: expected a positive number, got 0",
                    "strategy.distance: expected one of mse, kl, got 'l1'",
                    "strategy.logit_dtype: expected one of float16, bfloat16, float32, got 'int8'",
                    "strategy.alpha: expected a non-negative number, got -1.0"]
    assert DERConfig(alpha=0.0, beta=0.0).errors("strategy")[0].startswith("strategy.alpha: alpha and beta are both 0")
    assert DERConfig(insertion="epoch").errors("strategy") == [
        "strategy.insertion: expected one of step, task_end, got 'epoch'"]
    assert DERConfig(sampling="hardest", per_task=True).errors("strategy") == [
        "strategy.sampling: insertion=step fills the buffer by reservoir sampling at every step, got 'hardest'; set "
        "sampling=reservoir or insertion=task_end",
        "strategy.per_task: insertion=step keeps one reservoir over every example seen; set per_task=false or "
        "insertion=task_end"]
    assert DERConfig(sampling="hardest", per_task=True, insertion="task_end").errors("strategy") == []


def test_on_an_encoder_decoder_der_stores_and_replays_the_decoders_logits_on_the_targets():
    """tiny_t5: the stored logits are the decoder's on the target tokens, the step gets the gradient of the DER++
    loss written out on Hugging Face's own forward of each example, and two tasks train through the loop."""
    model = tiny_t5()
    ctx = t5_context(model, tasks=2, n=6)
    der = DER(DERConfig(buffer_size=6, replay_batch_size=6, alpha=0.3, beta=0.7, logit_dtype="float32",
                        insertion="task_end"))
    der.after_task(ctx)
    ctx.task_index = 1
    buffer = der.buffer.examples
    with torch.no_grad():
        for example in buffer:
            torch.testing.assert_close(der.logits[example[ID]][0], hf_target_logits(model, example), atol=1e-5,
                                       rtol=1e-5)
        model.shared.weight.mul_(1.5)  # the model moved on since insertion
    d, nll = [], []
    for example in buffer:
        now, (stored, _) = hf_target_logits(model, example), der.logits[example[ID]]
        d.append(((now - stored) ** 2).mean(-1))
        nll.append(-torch.log_softmax(now, -1).gather(1, torch.tensor(split(example)[1])[:, None]).squeeze(1))
    (0.3 * torch.cat(d).mean() + 0.7 * torch.cat(nll).mean()).backward()
    want = [p.grad.clone() + 1.0 for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    der.after_backward(ctx)
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-4)
    assert float(ctx.extras["der_distance"]) > 0
    model.zero_grad(set_to_none=True)
    before = task_perplexity(ctx, 1)
    train(ctx, der, 1, epochs=3)
    assert float(ctx.extras["der_distance"]) > 0 and der.steps > 0
    assert task_perplexity(ctx, 1) < before


# ------------------------------------------------------------------ insertion=step: mammoth's DER++, step by step

SEED, FILL_SALT, DRAW_SALT = 0, 61, 62  # the run seed, and the salts of the reservoir's and the draws' generators


def seeded(task: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 1_000_003 + task * 7919 + salt)  # base.derived_seed


def target_logits(model, example) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the example's target positions (T, V), the target ids (T,)), the example alone."""
    labels = example["labels"]
    positions = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
    logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, positions]
    return logits, torch.tensor([labels[t + 1] for t in positions])


def mammoth_derpp(model, tasks, alpha, beta, buffer_size, minibatch, epochs, batch_size, lr):
    """mammoth's Derpp.observe and Buffer (reservoir, get_data) on these examples, written out in plain torch:
    the loss backward, then with a non-empty buffer alpha * MSE on one draw and beta * CE on another, the step,
    then every example of the batch offered to the reservoir with the logits of the batch's forward. AdamW and
    the linear decay as the loop makes them; our seeded generators in place of numpy's global one."""
    buffer, seen = [], 0  # (example, its stored target logits)
    model.train()
    for task, data in enumerate(tasks):
        fill, draw = seeded(task, FILL_SALT), seeded(task, DRAW_SALT)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                weight_decay=0.0)
        total = epochs * math.ceil(len(data) / batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, total=total: (total - s) / total)
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=seeded(task, 100_000 + epoch)).tolist()
            for start in range(0, len(order), batch_size):
                batch = [data[i] for i in order[start : start + batch_size]]
                opt.zero_grad()
                outputs = [target_logits(model, e) for e in batch]
                z, y = torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
                torch.nn.functional.cross_entropy(z, y).backward()
                if buffer:
                    n = min(minibatch, len(buffer))
                    picked = [buffer[i] for i in torch.randperm(len(buffer), generator=draw)[:n].tolist()]
                    now = torch.cat([target_logits(model, e)[0] for e, _ in picked])
                    (alpha * torch.nn.functional.mse_loss(now, torch.cat([s for _, s in picked]))).backward()
                    picked = [buffer[i] for i in torch.randperm(len(buffer), generator=draw)[:n].tolist()]
                    now, y = zip(*[target_logits(model, e) for e, _ in picked], strict=True)
                    (beta * torch.nn.functional.cross_entropy(torch.cat(now), torch.cat(y))).backward()
                opt.step()
                schedule.step()
                u = torch.rand(len(batch), generator=fill, dtype=torch.float64)
                for i, (example, (logits, _)) in enumerate(zip(batch, outputs, strict=True)):
                    seen += 1
                    if len(buffer) < buffer_size:
                        buffer.append((example, logits.detach().clone()))
                    elif (j := int(u[i] * seen)) < buffer_size:
                        buffer[j] = (example, logits.detach().clone())
    return buffer


class SavedEveryStep(DER):
    """DER rebuilt from its saved state (torch.save / weights_only load, as a checkpoint) after every step."""

    def after_step(self, ctx):
        super().after_step(ctx)
        saved = io.BytesIO()
        torch.save(self.state_dict(), saved)
        saved.seek(0)
        DER.__init__(self, self.cfg)
        self.load_state_dict(torch.load(saved, weights_only=True))


# the second: slots shared within a step, the state saved and reloaded after every step, packed micro-batches
@pytest.mark.parametrize(("cls", "size", "batch", "layout"), [(DER, 4, 2, {}),
                                                              (SavedEveryStep, 2, 6, {"pack": True, "grad_accum": 2})])
def test_the_default_update_is_mammoths_derpp_step_by_step(cls, size, batch, layout):
    """Two tasks through the real loop with DER++'s defaults (insertion=step) end with the parameters of mammoth's
    update replayed by hand (test-owned model copy, buffer and optimizer): reservoir slots, the two draws, the
    MSE and CE terms, the stored logits of each example's own step, replay from the first task's second step;
    also with packed rows (the logits of each example found in them) and two micro-batches per step."""
    model, data = tiny_model(), examples(12)
    # the keys' weights and bias have directions whose true gradient is 0 (softmax ignores a shift shared by every
    # key), where AdamW turns float rounding into steps of about lr: frozen, so the comparison can be tight
    model.transformer.h[0].attn.c_attn.requires_grad_(False)
    reference = copy.deepcopy(model)
    tasks = [data[:6], data[6:]]
    cfg = DERConfig(buffer_size=size, replay_batch_size=3, alpha=0.3, beta=0.7, logit_dtype="float32")
    der, ctx = cls(cfg), context(model, data)
    ctx.task_names, ctx.train_sets = ["a", "b"], tasks
    train_cfg = TrainConfig(epochs=2, batch_size=batch, lr=1e-2, warmup_ratio=0.0, keep_best=False, max_grad_norm=None,
                            max_length=12, **layout)
    for task in (0, 1):
        ctx.task_index = task
        train_task(TaskRun(ctx, der, tasks[task], train_cfg, validate=lambda tasks: 0.0))
    buffer = mammoth_derpp(reference, tasks, 0.3, 0.7, size, 3, epochs=2, batch_size=batch, lr=1e-2)
    steps = 2 * 2 * math.ceil(6 / batch)
    assert der.buffer.seen_total == 24 and der.steps == steps - 1  # the first step has an empty buffer
    assert [e["input_ids"] for e in der.buffer.examples] == [e["input_ids"] for e, _ in buffer]
    for example, (_, want) in zip(der.buffer.examples, buffer, strict=True):
        torch.testing.assert_close(der.logits[example[ID]][0], want, atol=1e-5, rtol=1e-4)
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        # 1e-4: an entry with a near-zero gradient moves by AdamW's rounding-amplified step (measured 4e-5); a
        # wrong update (one shared draw, another slot, end-of-task logits) moves thousands of entries by ~1e-3
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)


def test_each_examples_logits_are_found_in_packed_rows():
    """Packed first fit puts example 2 beside example 0 (rows [0, 2], [1]): its targets come second in the
    row-major target order, and they are the logits of the packed forward at its own positions."""
    model, data = tiny_model(), [examples(3)[i] for i in (0, 2, 1)]
    sizes = [len(e["input_ids"]) for e in data]
    length = sizes[0] + sizes[2]
    assert sizes[0] + sizes[1] > length >= sizes[1]  # example 1 does not fit beside example 0: a second row
    rows = example_rows(data, length)
    counts = [sum(1 for x in e["labels"][1:] if x != -100) for e in data]
    assert rows == {0: (0, counts[0]), 2: (counts[0], counts[0] + counts[2]),
                    1: (counts[0] + counts[2], sum(counts))}
    assert example_rows(data, None) == {0: (0, counts[0]), 1: (counts[0], counts[0] + counts[1]),
                                        2: (counts[0] + counts[1], sum(counts))}
    batch = pack(data, length, partial(collate, pad_id=0))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        flat = logits[:, :-1][batch["labels"][:, 1:] != -100]
        for i, example in enumerate(data):
            start, end = rows[i]
            torch.testing.assert_close(flat[start:end], model_logits(model, example), atol=1e-5, rtol=1e-4)
