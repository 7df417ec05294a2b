"""The loop: every hook is reached in order (epoch hooks also when the step budget ends an epoch), gradient
accumulation equals one large batch, best epoch restored, logged values reach the step events and records."""

import copy
from contextlib import nullcontext

import torch
from tiny_loop import context, examples, tiny_model

from cl_runner.config.schema import EvalConfig, TrainConfig
from cl_runner.engine.loop import LoopCallbacks, TaskRun, train_task
from cl_runner.scoring.evaluate import Scorer
from cl_runner.scoring.sequence import SequenceScorer
from cl_runner.strategies.base import Strategy
from cl_runner.tasks.base import Task
from cl_runner.tasks.encode import EncodedTask, EvalItem


def validation(model, strategy, data):
    """The run's real validation (a ``SequenceScorer`` pass: ``before_eval``, scoring, ``after_eval``)."""
    items = [EvalItem(prompt_ids=e["input_ids"][:2], target_ids=e["input_ids"][2:], target="") for e in data[:4]]
    task = Task(name="a", metric="perplexity", train=[], validation=[], test=[])
    encoded = EncodedTask(name="a", train=data, validation=items, test=items, label_ids=None)
    scorer = Scorer(model=model, pad_id=0, eos_id=1, device=torch.device("cpu"), autocast=nullcontext,
                    batch_size=8, cfg=EvalConfig(), decode=str)
    return SequenceScorer(scorer, [task], [encoded], strategy, context(model, data)).validate


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

    def before_epoch(self, ctx):
        self.calls.append(f"before_epoch {ctx.epoch}")

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

    def after_epoch(self, ctx):
        self.calls.append(f"after_epoch {ctx.epoch}")

    def before_eval(self, ctx, task_index):
        self.calls.append(f"before_eval {task_index}")

    def after_eval(self, ctx):
        self.calls.append("after_eval")

    def after_task(self, ctx):
        self.calls.append("after_task")


def test_every_hook_is_reached_in_order():
    data = examples(8)
    strategy, model = Recorder(), tiny_model()
    cfg = TrainConfig(epochs=2, batch_size=4, grad_accum=2, keep_best=True, validate_every=1)
    train_task(TaskRun(context(model, data), strategy, data, cfg, validate=validation(model, strategy, data)))
    assert strategy.calls[:3] == ["before_task", "train_dataset", "validation_tasks"]
    # 8 examples, batch 4 = 2 optimizer steps of 2 micro-batches each, then the validation pass
    step = ["loss", "loss", "after_backward", "after_step"]
    epoch = [["train_batches", *step, *step, f"after_epoch {e}", "before_eval 0", "after_eval"] for e in (0, 1)]
    assert strategy.calls[3:] == ["before_epoch 0", *epoch[0], "before_epoch 1", *epoch[1], "after_task"]


def test_step_budget_ending_an_epoch_still_closes_it_once():
    data = examples(16)  # 4 steps per epoch; a budget of 6 ends the second epoch after 2 of its steps
    strategy = Recorder()
    cfg = TrainConfig(max_steps=6, batch_size=4, keep_best=False)
    train_task(TaskRun(context(tiny_model(), data), strategy, data, cfg, validate=lambda idx: 0.0))
    epochs = [c for c in strategy.calls if c.split()[0] in ("before_epoch", "after_epoch")]
    assert epochs == ["before_epoch 0", "after_epoch 0", "before_epoch 1", "after_epoch 1"]
    assert strategy.calls.count("after_step") == 6
    assert strategy.calls[strategy.calls.index("after_epoch 1") - 1] == "after_step"


class Logger(Strategy):
    """Logs a tensor in ``loss`` (read by the loop with the loss) and a float in ``after_step``."""

    def loss(self, ctx, batch, outputs, loss):
        ctx.log(loss_copy=loss.detach() * 1.0)
        return loss

    def after_step(self, ctx):
        ctx.log(steps_seen=float(ctx.step))


class Events(LoopCallbacks):
    def __init__(self):
        self.steps, self.records = [], []

    def on_step(self, event):
        if event["event"] == "step":
            self.steps.append(event)

    def on_epoch(self, record):
        self.records.append(record)


def test_logged_values_reach_step_events_and_epoch_records_as_floats():
    data = examples(8)
    events = Events()
    cfg = TrainConfig(epochs=2, batch_size=4, keep_best=False, log_every=1)
    train_task(TaskRun(context(tiny_model(), data), Logger(), data, cfg, validate=lambda idx: 0.0,
                       callbacks=events))
    assert [type(v) for e in events.steps for v in e["extras"].values()] == [float] * 8
    assert events.steps[0]["extras"]["loss_copy"] == events.steps[0]["loss"]  # one micro-batch per step
    assert [r.extras for r in events.records] == [{"loss_copy": events.steps[i]["loss"], "steps_seen": s}
                                                  for i, s in ((1, 2.0), (3, 4.0))]


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
        train_task(TaskRun(context(tiny_model(), data), recorder, data, cfg, validate=lambda idx: 0.0))
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

    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-2, validate_every=1)
    train_task(TaskRun(context(model, data), Strategy(), data, cfg, validate))
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[0][key])
    assert not torch.equal(snapshots[0]["lm_head.weight"], snapshots[2]["lm_head.weight"])
