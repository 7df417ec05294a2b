"""The loop: every hook is reached in order, gradient accumulation equals one large batch, best epoch restored."""

import copy
from contextlib import nullcontext
from functools import partial

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cl_runner.lm import collate
from cl_runner.loop import train_task
from cl_runner.schema import TrainConfig
from cl_runner.strategies.base import Context, Strategy


def tiny_model():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=40, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: exact comparisons
    return GPT2LMHeadModel(config)


def examples(n=16):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, 40, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        target = torch.randint(3, 40, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist() + [1]
        out.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target, "task_id": 0})
    return out


def context(model, data):
    return Context(model=model, device=torch.device("cpu"), autocast=nullcontext,
                   collate=partial(collate, pad_id=0), task_names=["a"], train_sets=[data])


class Recorder(Strategy):
    def __init__(self):
        super().__init__()
        self.calls = []

    def before_task(self, ctx):
        self.calls.append("before_task")

    def train_dataset(self, ctx, examples):
        self.calls.append("train_dataset")
        return examples

    def validation_tasks(self, ctx):
        self.calls.append("validation_tasks")
        return [0]

    def train_batches(self, ctx, batches):
        self.calls.append("train_batches")
        yield from batches

    def loss(self, ctx, batch, outputs, loss):
        self.calls.append("loss")
        return loss

    def after_backward(self, ctx):
        self.calls.append("after_backward")

    def after_step(self, ctx):
        self.calls.append("after_step")

    def after_task(self, ctx):
        self.calls.append("after_task")


def test_every_hook_is_reached_in_order():
    data = examples(8)
    strategy = Recorder()
    cfg = TrainConfig(epochs=1, batch_size=4, grad_accum=2, keep_best=False)
    train_task(context(tiny_model(), data), strategy, data, cfg, validate=lambda idx: 0.0)
    assert strategy.calls[:3] == ["before_task", "train_dataset", "validation_tasks"]
    # 8 examples, batch 4 = 2 optimizer steps of 2 micro-batches each
    step = ["loss", "loss", "after_backward", "after_step"]
    assert strategy.calls[3:] == ["train_batches", *step, *step, "after_task"]


class GradRecorder(Strategy):
    def after_backward(self, ctx):
        self.grads = torch.cat([p.grad.flatten().clone() for p in ctx.model.parameters()])


def test_gradient_accumulation_equals_one_large_batch():
    # Compared at the gradient: Adam's first step is ~lr * sign(g), which magnifies float noise on tiny grads.
    data = examples(8)
    grads = []
    for accum in (1, 4):
        recorder = GradRecorder()
        cfg = TrainConfig(max_steps=1, batch_size=8, grad_accum=accum, keep_best=False, max_grad_norm=None)
        train_task(context(tiny_model(), data), recorder, data, cfg, validate=lambda idx: 0.0)
        grads.append(recorder.grads)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_best_epoch_weights_are_restored():
    data = examples(8)
    model = tiny_model()
    snapshots = []
    scores = iter([0.9, 0.1, 0.2])  # epoch 1 is best

    def validate(indices):
        snapshots.append(copy.deepcopy(model.state_dict()))
        return next(scores)

    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-2)
    train_task(context(model, data), Strategy(), data, cfg, validate)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[0][key])
    assert not torch.equal(snapshots[0]["lm_head.weight"], snapshots[2]["lm_head.weight"])
