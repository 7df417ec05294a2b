"""The loop's hot path: no device read per step (losses, token counts and the finiteness check are read every
train.log_every steps), a non-finite loss still named by its step, history seconds without checkpoint time,
tokens/s and MFU in history, and AdamW fused on CPU with the unfused result."""

from __future__ import annotations

import math
import traceback

import pytest
import torch
from tiny_loop import context, examples, tiny_model

from cl_runner.config.schema import TrainConfig
from cl_runner.engine import loop as loop_module
from cl_runner.engine.flops import flops_per_token, mfu, peak_flops, peak_flops_of
from cl_runner.engine.loop import LoopCallbacks, TaskRun, make_optimizer, step_batches, train_task
from cl_runner.models.lm import causal_lm_loss
from cl_runner.strategies.base import Strategy


def run(data, cfg, strategy=None, callbacks=None, model=None):
    job = TaskRun(context(model or tiny_model(), data), strategy or Strategy(), data, cfg,
                  validate=lambda idx: 0.0, callbacks=callbacks or LoopCallbacks())
    return train_task(job)


class Events(LoopCallbacks):
    def __init__(self):
        self.steps = []

    def on_step(self, event):
        if event["event"] == "step":
            self.steps.append(event)


def test_losses_are_read_every_log_every_steps_and_sum_the_same_whatever_the_interval():
    data = examples(16)  # 4 steps per epoch, 3 epochs
    records, events = {}, {}
    for every in (1, 3):
        events[every] = Events()
        cfg = TrainConfig(epochs=3, batch_size=4, keep_best=False, log_every=every)
        records[every] = run(data, cfg, callbacks=events[every])
    assert [e["step"] for e in events[1].steps] == list(range(1, 13))
    assert [e["step"] for e in events[3].steps] == [3, 4, 6, 8, 9, 12]  # every 3 steps, and each epoch's end
    assert [r.train_loss for r in records[3]] == [r.train_loss for r in records[1]]
    first_epoch = [e["loss"] for e in events[1].steps[:4]]
    assert events[3].steps[1]["loss"] == pytest.approx(first_epoch[3])  # the mean of the steps since the last


class HostReads:
    """Records which cl_runner function reads a tensor's value on the host (each a device sync on a GPU); the
    model's own reads (transformers' mask checks) are not the loop's to remove."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch):
        self.callers = []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self.recording(getattr(torch.Tensor, name)))

    def recording(self, real):
        def read(tensor, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if "/cl_runner/" in caller.filename:
                self.callers.append(caller.name)
            return real(tensor, *args, **kwargs)

        return read


def test_no_tensor_is_read_on_the_host_between_log_points(monkeypatch):
    data = examples(16)  # 4 steps of 2 micro-batches each: one epoch, one read at its end
    cfg = TrainConfig(epochs=1, batch_size=4, grad_accum=2, keep_best=False, log_every=100)
    reads = HostReads(monkeypatch)
    run(data, cfg)
    assert reads.callers == ["step_batches", "_read"]  # the epoch's order (a CPU generator), then the losses


class NaNAt(Strategy):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def loss(self, ctx, batch, outputs, loss):
        return loss * math.nan if ctx.step + 1 == self.step else loss


class Checkpointing(LoopCallbacks):
    def __init__(self, at):
        self.at, self.saved = at, []

    def on_boundary(self, boundary):
        if boundary.kind == "step" and boundary.loop.step in self.at:
            self.saved.append(boundary.state_dict()["loop"]["loss_sum"])


def test_a_non_finite_loss_names_its_step_and_the_steps_read():
    data = examples(32)  # 8 steps per epoch
    cfg = TrainConfig(epochs=1, batch_size=4, keep_best=False, log_every=5)
    with pytest.raises(FloatingPointError, match=r"step 3 \(losses are read every train.log_every=5 steps; this "
                                                 r"read covered steps 1-5\)"):
        run(data, cfg, NaNAt(3))


def test_a_checkpoint_reads_the_pending_losses_first_so_it_never_holds_a_non_finite_state():
    data = examples(32)
    cfg = TrainConfig(epochs=1, batch_size=4, keep_best=False, log_every=5)
    callbacks = Checkpointing(at={2, 4})
    with pytest.raises(FloatingPointError, match=r"step 3 .* steps 3-4\)"):
        run(data, cfg, NaNAt(3), callbacks)
    assert len(callbacks.saved) == 1 and math.isfinite(callbacks.saved[0])


class FakeClock:
    """``time.perf_counter`` for the loop: one second per call, plus whatever a slow callback "spends"."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


class SlowCheckpoints(LoopCallbacks):
    def __init__(self, clock):
        self.clock = clock

    def on_boundary(self, boundary):
        self.clock.now += 1000.0  # a checkpoint that takes 1000 s

    def on_step(self, event):
        self.clock.now += 1000.0  # and a slow progress bar


def test_history_seconds_exclude_the_callbacks_and_tokens_per_s_counts_real_tokens(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(loop_module.time, "perf_counter", clock)
    data = examples(16)
    cfg = TrainConfig(epochs=2, batch_size=4, keep_best=False, log_every=1)
    records = run(data, cfg, callbacks=SlowCheckpoints(clock))
    assert all(r.seconds < 100 for r in records)  # 4 steps x (1 checkpoint + 1 event) x 1000 s are not in it
    real_tokens = sum(len(e["input_ids"]) for e in data)
    assert [r.tokens_per_s * r.seconds for r in records] == pytest.approx([real_tokens] * 2)
    targets = sum(sum(1 for label in e["labels"][1:] if label != -100) for e in data)
    assert 0 < targets < real_tokens
    assert [r.target_tokens_per_s * r.seconds for r in records] == pytest.approx([targets] * 2)
    assert [r.mfu for r in records] == [None, None]  # CPU: no peak


def test_mfu_uses_the_device_peak_and_six_flops_per_trained_parameter():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops_of("NVIDIA H200") == peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("NVIDIA A10G") == 70e12 and peak_flops_of("Some Future GPU") is None
    model = tiny_model()
    n = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model) == 6 * n
    model.transformer.requires_grad_(False)  # frozen body: no weight gradients there
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < n and flops_per_token(model) == 4 * n + 2 * trainable
    assert mfu(6 * n, 1000.0, 1e12) == pytest.approx(6 * n * 1000 / 1e12) and mfu(1.0, 1.0, None) is None


def test_adamw_is_fused_on_cpu_and_one_step_matches_the_unfused_one():
    cfg = TrainConfig(weight_decay=0.1)
    models = [tiny_model(), tiny_model()]
    fused = make_optimizer(models[0], cfg, torch.device("cpu"))
    plain = make_optimizer(models[1], cfg, torch.device("mps"))  # a device without the fused kernel: foreach
    assert fused.defaults["fused"] and not plain.defaults["fused"] and plain.defaults["foreach"]
    generator = torch.Generator().manual_seed(0)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        a.grad = torch.randn(a.shape, generator=generator)
        b.grad = a.grad.clone()
    fused.step()
    plain.step()
    for a, b, start in zip(models[0].parameters(), models[1].parameters(), tiny_model().parameters(), strict=True):
        assert not torch.equal(a, start)
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_the_chunked_loss_has_the_value_and_gradient_of_the_whole_one(chunk):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (3, 9), generator=generator)
    labels[:, :3] = -100  # prompts
    labels[2, 6:] = -100  # padding
    logits = torch.randn(3, 9, 50, generator=generator, requires_grad=True)
    whole = causal_lm_loss(logits, labels)
    (expected,) = torch.autograd.grad(whole, logits)
    chunked = causal_lm_loss(logits, labels, chunk_tokens=chunk)
    (got,) = torch.autograd.grad(chunked, logits)
    assert torch.allclose(chunked, whole, rtol=1e-6) and torch.allclose(got, expected, atol=1e-7)
    assert expected[:, -1].abs().sum() == 0 and expected[:, :2].abs().sum() == 0  # no target there


def test_length_grouping_is_off_by_default_and_only_reorders_an_epoch():
    data = examples(40)
    plain = step_batches(data, 4, torch.Generator().manual_seed(3))
    assert plain == step_batches(data, 4, torch.Generator().manual_seed(3), group_by_length=False)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)).tolist()
    assert plain == [[data[i] for i in order[k : k + 4]] for k in range(0, 40, 4)]  # the order before grouping
    grouped = step_batches(data, 4, torch.Generator().manual_seed(3), group_by_length=True)
    assert sorted(map(id, sum(grouped, []))) == sorted(map(id, data))

    def padding(batches):
        return sum(len(b) * max(len(e["input_ids"]) for e in b) - sum(len(e["input_ids"]) for e in b)
                   for b in batches)

    assert padding(grouped) < padding(plain) and TrainConfig().group_by_length is False
