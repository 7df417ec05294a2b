"""train.activation_checkpointing (cl_runner/engine/activations.py): the blocks are really recomputed in backward,
and the loss and every gradient equal those without it, for full fine-tuning (dropout on: recomputation draws the
same masks), an adapter strategy, prompt tuning, an encoder-decoder, the fallback for models without
transformers' switch, FSDP's per-block sharding; a short run's matrix equals the run without it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_config, run_quietly
from tiny_lm import one_thread, task_examples, tiny_context, tiny_model  # noqa: F401 - the fixture
from tiny_t5 import tiny_t5

from cl_runner.engine import activations
from cl_runner.engine.parallel import transformer_blocks
from cl_runner.models.kinds import kind_of
from cl_runner.models.lm import causal_lm_loss
from cl_runner.strategies import build_strategy
from cl_runner.strategies.registry import strategy_class


def _step(model: torch.nn.Module, strategy_name: str, checkpointed: bool, fallback: bool = False):
    """One training micro-batch through ``strategy_name``'s before_task and loss hooks: (loss, {name: grad})."""
    if fallback:
        model.supports_gradient_checkpointing = False  # as a model without transformers' switch
    if checkpointed:
        activations.enable(model)
        assert activations.is_enabled(model)
    ctx = tiny_context(model)
    ctx.kind = kind_of(model)
    strategy = build_strategy(strategy_class(strategy_name).Config(name=strategy_name))
    strategy.before_task(ctx)
    model.train()
    batch, inputs = ctx.kind.training_batch(task_examples(0, 6), ctx.collate, None)
    torch.manual_seed(5)  # dropout's masks: the same draw with and without recomputation
    outputs = model(**inputs)
    loss = strategy.loss(ctx, batch, outputs, causal_lm_loss(outputs.logits, batch["labels"]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads  # something trains
    return loss.detach(), grads


def _with_dropout() -> torch.nn.Module:
    model = tiny_model()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    return model


@pytest.mark.parametrize("strategy", ["naive", "shared_lora", "prompt_tuning"])
@pytest.mark.parametrize("model", ["gpt2_dropout", "t5", "gpt2_fallback"])
def test_loss_and_gradients_equal_those_without_checkpointing(strategy, model):
    if (strategy, model) == ("prompt_tuning", "t5"):
        pytest.skip("prompt_tuning refuses encoder-decoders (its supports)")
    build = {"gpt2_dropout": _with_dropout, "t5": tiny_t5, "gpt2_fallback": tiny_model}[model]
    fallback = model == "gpt2_fallback"
    loss_off, grads_off = _step(build(), strategy, checkpointed=False)
    loss_on, grads_on = _step(build(), strategy, checkpointed=True, fallback=fallback)
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=0, atol=1e-6, msg=name)


def _inner_calls(model: torch.nn.Module) -> list[int]:
    """A counter of the forward calls of every block's first child (inside the recomputed part)."""
    calls = [0]
    for block in transformer_blocks(model):
        next(block.children()).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("fallback", [False, True])
def test_blocks_run_again_in_backward_only_when_training_with_gradients(fallback):
    model = tiny_model()
    if fallback:
        model.supports_gradient_checkpointing = False
    assert activations.enable(model) == ("blocks" if fallback else "transformers")
    calls, ids = _inner_calls(model), torch.tensor([[7, 10, 5, 6, 30]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls[0] == 2 * model.config.n_layer  # forward, then the recomputation in backward
    calls[0] = 0
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert calls[0] == model.config.n_layer
    plain = tiny_model()
    plain_calls = _inner_calls(plain)
    plain.train()
    plain(input_ids=ids, labels=ids).loss.backward()
    assert plain_calls[0] == plain.config.n_layer and not activations.is_enabled(plain)


def test_a_deep_copy_checkpoints_its_own_blocks():
    """LwF's teacher is a deep copy: the fallback's per-block forward must run the copy's weights."""
    model = tiny_model()
    model.supports_gradient_checkpointing = False
    activations.enable(model)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ids = torch.tensor([[7, 10, 5, 6, 30]])
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, tiny_model()(input_ids=ids).logits)


def test_fsdp_shards_the_checkpointed_blocks_with_the_same_gradients(tmp_path):
    """One process under FSDP2 (gloo): ``fully_shard`` per block over checkpointed blocks, gradients as plain."""
    import torch.distributed as tdist

    from cl_runner.config.schema import DistributedConfig
    from cl_runner.engine.parallel import shard

    _, reference = _step(tiny_model(), "naive", checkpointed=False)
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_model()
        activations.enable(model)
        shard(model, DistributedConfig(kind="fsdp"))
        calls = _inner_calls(model)
        _, grads = _step(model, "naive", checkpointed=False)
        assert calls[0] == 2 * model.config.n_layer
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name].full_tensor(), grad, rtol=0, atol=1e-6, msg=name)
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def matrices(tmp_path_factory) -> dict[bool, str]:
    root = tmp_path_factory.mktemp("ac")
    out = {}
    for on in (False, True):
        cfg = make_config("train.epochs=2", "train.max_steps=4", "train.keep_best=false", "checkpoint.enabled=false",
                          "eval.save_predictions=none", "eval.max_examples=16",
                          f"train.activation_checkpointing={str(on).lower()}")
        run_quietly(cfg, root / str(on))
        out[on] = (root / str(on) / "accuracy_matrix.csv").read_text()
    return out


@pytest.mark.slow
def test_a_short_run_gives_the_same_matrix_with_checkpointing(matrices):
    assert matrices[True] == matrices[False]
