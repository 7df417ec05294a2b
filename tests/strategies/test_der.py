"""DER / DER++ (cl_runner/strategies/der.py): the logit distances against hand computations, the stored logits
against the model's at insertion, the step's extra gradient against autograd on the loss written out by hand; the
same on an encoder-decoder (tiny_t5), against Hugging Face's own forward of each example."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_lm import one_thread, train  # noqa: F401 (autouse fixture)
from tiny_loop import context, examples, tiny_model
from tiny_t5 import hf_target_logits, split, t5_context, task_perplexity, tiny_t5

from cl_runner.models.lm import collate
from cl_runner.strategies.der import DER, ID, DERConfig, logit_distance

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
    der, _, model = der_after_first_task(DERConfig(buffer_size=4, top_k=top_k))
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
    cfg = DERConfig(buffer_size=6, replay_batch_size=6, alpha=0.3, beta=beta, distance=distance)
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


def test_on_an_encoder_decoder_der_stores_and_replays_the_decoders_logits_on_the_targets():
    """tiny_t5: the stored logits are the decoder's on the target tokens, the step gets the gradient of the DER++
    loss written out on Hugging Face's own forward of each example, and two tasks train through the loop."""
    model = tiny_t5()
    ctx = t5_context(model, tasks=2, n=6)
    der = DER(DERConfig(buffer_size=6, replay_batch_size=6, alpha=0.3, beta=0.7, logit_dtype="float32"))
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
