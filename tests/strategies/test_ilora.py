"""I-LoRA: the EMA of the slow adapter and the consistency loss by hand, its step normalisation, and the two
adapters through a short sequence (base frozen, slow trails fast, evaluation on the slow one); on an
encoder-decoder (tiny_t5): the consistency over both stacks against Hugging Face's own forward, and training."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config
from tiny_lm import one_thread, tiny_context, tiny_model, train  # noqa: F401 (autouse fixture)
from tiny_t5 import hf_outputs, t5_context, task_perplexity, tiny_t5

from cl_runner.core.errors import UserError
from cl_runner.engine.loop import split, weighted
from cl_runner.strategies.base import MicroBatch
from cl_runner.strategies.ilora import ILoRA, ILoRAConfig, consistency_sum, ema_
from cl_runner.strategies.lora import lora_parameters


def test_ema_moves_slow_towards_fast_by_the_interpolation_coefficient():
    slow, fast = [torch.tensor([1.0, -2.0]), torch.tensor([[4.0]])], [torch.tensor([3.0, 2.0]), torch.tensor([[0.0]])]
    ema_(slow, fast, 0.25)
    assert slow[0].tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * -2 + 0.75 * 2] and slow[1].item() == 1.0


def test_consistency_is_the_reference_mse_against_the_elementwise_max_over_real_positions():
    torch.manual_seed(0)
    fast = tuple(torch.randn(2, 3, 4) for _ in range(3))  # 3 hidden states, 2 rows, 3 positions, width 4
    slow = tuple(torch.randn(2, 3, 4) for _ in range(3))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    want = 0.0
    for f, s in zip(fast, slow, strict=True):  # LLMCL: MSE(plastic, where(plastic > stable, plastic, stable))
        target = torch.where(f > s, f, s)
        for r in range(2):
            for t in range(3):
                if mask[r, t]:
                    want += sum(float(f[r, t, u] - target[r, t, u]) ** 2 for u in range(4)) / (3 * 4)
    assert float(consistency_sum(fast, slow, mask)) == pytest.approx(want, rel=1e-6)
    both_ways = sum(float(((s - f) ** 2).sum(-1).mul(mask).sum()) for f, s in zip(fast, slow, strict=True)) / 12
    assert float(consistency_sum(fast, slow, mask, one_sided=False)) == pytest.approx(both_ways, rel=1e-6)
    assert float(consistency_sum(slow, slow, mask)) == 0.0


def ready(ema_lambda: float = 0.25) -> tuple:
    """A tiny model with both adapters, task 0 in the buffer, the slow adapter moved off the fast one."""
    model = tiny_model()
    ctx = tiny_context(model, tasks=2)
    strategy = ILoRA(ILoRAConfig(rank=2, ema_lambda=ema_lambda))
    strategy.before_task(ctx)
    ctx.task_index = 0
    strategy.after_task(ctx)
    ctx.task_index = 1
    with torch.no_grad():
        for _, p in lora_parameters(model, "slow"):
            p.add_(0.3 * torch.randn_like(p))
    return model, ctx, strategy


@pytest.mark.parametrize("ema_lambda,step,a", [(0.25, 1, 0.25), (0.9, 1, 0.5), (0.9, 3, 0.75), (0.5, 9, 0.5)])
def test_after_step_applies_the_references_coefficient(ema_lambda, step, a):
    model, ctx, strategy = ready(ema_lambda)
    slow, fast = dict(lora_parameters(model, "slow")), dict(lora_parameters(model, "fast"))
    want = {n: a * p.detach() + (1 - a) * fast[n.replace(".slow.", ".fast.")].detach() for n, p in slow.items()}
    ctx.step = step
    strategy.after_step(ctx)
    for n, p in slow.items():
        torch.testing.assert_close(p.detach(), want[n])


def test_consistency_term_adds_up_over_micro_batches_to_the_mean_over_the_steps_replayed_tokens():
    model, ctx, strategy = ready()
    step = ctx.train_sets[1][:3] + strategy.buffer.examples[:3]
    strategy.before_epoch(ctx)
    terms = []
    for examples, weight in weighted(split(step, 3)):
        ctx.micro = MicroBatch(examples, step, weight)
        batch = ctx.collate(examples)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        zero = torch.zeros(())
        terms.append(float(strategy.loss(ctx, batch, outputs, zero).detach()) * weight)
    strategy.after_epoch(ctx)
    replayed = strategy.buffer.examples[:3]
    batch = ctx.collate(replayed)
    with torch.no_grad():
        fast = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        strategy.before_eval(ctx, 0)  # evaluation runs on the slow adapter
        slow = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        strategy.after_eval(ctx)
    mask = batch["attention_mask"].float()
    one_sided = strategy.cfg.consistency == "max"
    want = float(consistency_sum(fast.hidden_states, slow.hidden_states, mask, one_sided) / mask.sum())
    assert want > 0 and terms[0] == 0.0  # the first micro-batch holds new examples only
    assert sum(terms) == pytest.approx(want, rel=1e-5)


def test_two_tasks_train_fast_only_slow_trails_it_and_evaluation_uses_slow():
    model = tiny_model()
    ctx = tiny_context(model, tasks=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = ILoRA(ILoRAConfig(rank=2, buffer_size=4))
    for task in range(2):
        train(ctx, strategy, task, epochs=1)
    adapters = {n for n, _ in lora_parameters(model)}
    # peft renames an adapted layer's own weight to ``<layer>.base_layer.weight``: map it back, so that every
    # base parameter is compared, the adapted layers' ones included
    frozen = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if n not in adapters}
    assert frozen.keys() == base.keys()
    assert [n for n, p in frozen.items() if not torch.equal(p, base[n])] == []  # the base never trains
    fast = {n: p for n, p in lora_parameters(model, "fast") if "lora_B" in n}
    slow = {n.replace(".slow.", ".fast."): p for n, p in lora_parameters(model, "slow") if "lora_B" in n}
    assert slow.keys() == fast.keys() and len(fast) == 2 * 4  # 2 blocks x 4 adapted layers
    assert all(p.abs().sum() > 0 for p in slow.values())
    assert any(not torch.equal(p, slow[n]) for n, p in fast.items())
    assert "ilora_consistency" in ctx.extras and len(strategy.buffer) == 4
    ids = torch.tensor([ctx.train_sets[0][0]["input_ids"]])
    strategy.before_eval(ctx, 0)
    scored = model(input_ids=ids).logits
    strategy.after_eval(ctx)
    assert not torch.equal(scored, model(input_ids=ids).logits)  # the fast adapter is back for training
    costs = strategy.accounting()
    assert costs["extra_parameters"] == 2 * costs["trainable_parameters"] == 2 * sum(p.numel() for _, p in
                                                                                     lora_parameters(model, "fast"))


@pytest.mark.parametrize("override,key", [
    ("strategy.ema_lambda=1.5", "strategy.ema_lambda"),
    ("strategy.consistency_weight=-1", "strategy.consistency_weight"),
    ("strategy.eval_adapter=both", "strategy.eval_adapter"),
    ("strategy.consistency=kl", "strategy.consistency"),
    ("strategy.replay_ratio=1", "strategy.replay_ratio"),
    ("strategy.rank=0", "strategy.rank"),
])
def test_bad_options_are_refused_in_one_line_naming_the_key(override, key):
    with pytest.raises(UserError) as err:
        make_config("strategy=ilora", override)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_on_an_encoder_decoder_the_consistency_covers_the_encoders_and_the_decoders_hidden_states():
    """tiny_t5: the term is the per-position mean over each stack's hidden states (encoder and decoder), summed
    over the replayed examples' positions of both (prompt + EOS, start + target) and divided by their number;
    Hugging Face's own forward of each replayed example alone is the reference."""
    model = tiny_t5()
    ctx = t5_context(model, tasks=2)
    strategy = ILoRA(ILoRAConfig(rank=2))
    strategy.before_task(ctx)
    strategy.after_task(ctx)
    ctx.task_index = 1
    with torch.no_grad():
        for _, p in lora_parameters(model, "slow"):
            p.add_(0.3 * torch.randn_like(p))
    step = ctx.train_sets[1][:3] + strategy.buffer.examples[:3]
    strategy.before_epoch(ctx)
    terms = []
    for examples, weight in weighted(split(step, 3)):
        ctx.micro = MicroBatch(examples, step, weight)
        batch, inputs = ctx.kind.training_batch(examples, ctx.collate)
        terms.append(float(strategy.loss(ctx, batch, model(**inputs), torch.zeros(())).detach()) * weight)
    strategy.after_epoch(ctx)
    total, positions = 0.0, 0
    with torch.no_grad():
        for example in strategy.buffer.examples[:3]:
            fast = hf_outputs(model, example, output_hidden_states=True)
            strategy.before_eval(ctx, 0)  # the slow adapter
            slow = hf_outputs(model, example, output_hidden_states=True)
            strategy.after_eval(ctx)
            for stack in ("encoder_hidden_states", "decoder_hidden_states"):
                f, s = getattr(fast, stack), getattr(slow, stack)
                total += float(consistency_sum(f, s, torch.ones(f[0].shape[:2]), one_sided=False))
                positions += f[0].size(1)
    assert positions == sum(len(e["input_ids"]) + 2 for e in strategy.buffer.examples[:3])
    assert total > 0 and terms[0] == 0.0  # the first micro-batch holds new examples only
    assert sum(terms) == pytest.approx(total / positions, rel=1e-5)


def test_on_an_encoder_decoder_two_tasks_train_the_fast_adapter_with_the_consistency_term():
    model = tiny_t5()
    ctx = t5_context(model, tasks=2)
    strategy = ILoRA(ILoRAConfig(rank=2, buffer_size=4))
    train(ctx, strategy, 0, epochs=1)
    before = task_perplexity(ctx, 1)
    train(ctx, strategy, 1, epochs=3, lr=3e-2)
    assert float(ctx.extras["ilora_consistency"]) > 0 and len(strategy.buffer) == 4
    fast = {n: p for n, p in lora_parameters(model, "fast") if "lora_B" in n}
    slow = {n.replace(".slow.", ".fast."): p for n, p in lora_parameters(model, "slow") if "lora_B" in n}
    assert any(not torch.equal(p, slow[n]) for n, p in fast.items())
    strategy.before_eval(ctx, 1)  # scored as the run scores it: on the slow adapter
    assert task_perplexity(ctx, 1) < before
    strategy.after_eval(ctx)
