"""adapters / shared_lora: a new adapter leaves the base and earlier adapters bit-identical; evaluation uses the
task's own adapter (or all of them, merged); the O-LoRA overlap; resume re-creates the adapters; end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_config, run_quietly
from tiny_lm import logits, one_thread, tiny_context, tiny_model, train  # noqa: F401 (autouse fixture)

from cl_runner.core.errors import ConfigError
from cl_runner.strategies.adapters import Adapters, AdaptersConfig, SharedLoRA, SharedLoRAConfig
from cl_runner.strategies.lora import add_lora, lora_parameters, subspace_overlap


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("options", [{}, {"merge": True, "orthogonal_lambda": 0.5}])
def test_a_new_adapter_leaves_the_base_and_earlier_adapters_bit_identical(options):
    model = tiny_model()
    ctx, strategy = tiny_context(model), Adapters(AdaptersConfig(target_modules=None, **options))  # every linear
    train(ctx, strategy, 0)
    for task in (1, 2):
        before = snapshot(model)
        train(ctx, strategy, task)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # base and earlier adapters: bit-identical
        added = {n for n, _ in lora_parameters(model, f"task{task}")}
        assert set(after) - set(before) == added and len(added) == 2 * 4 * 2  # A and B in 2 blocks x 4 layers
        lora_b = [p for n, p in lora_parameters(model, f"task{task}") if "lora_B" in n]
        assert len(lora_b) == 8 and all(p.abs().sum() > 0 for p in lora_b)  # trained (B starts at zero)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == \
            {n for n, _ in lora_parameters(model, f"task{task}")}


def merged_reference(plain: torch.nn.Module, adapted: torch.nn.Module, adapters: list[str]) -> torch.nn.Module:
    """The plain model with ``W + sum_a delta_a`` written into each adapted layer (no peft at all)."""
    from peft.tuners.lora import LoraLayer

    reference = copy.deepcopy(plain)
    with torch.no_grad():
        for name, module in adapted.named_modules():
            if isinstance(module, LoraLayer):
                for a in adapters:
                    reference.get_submodule(name).weight += module.get_delta_weight(a)
    return reference


def trained_adapters(options: dict) -> tuple[torch.nn.Module, torch.nn.Module, object, Adapters]:
    plain = tiny_model()
    model = copy.deepcopy(plain)
    ctx = tiny_context(model, tasks=4)
    strategy = Adapters(AdaptersConfig(**options))
    for task in range(3):  # task 3 is never trained: it has no adapter
        train(ctx, strategy, task)
    return plain, model, ctx, strategy


def test_evaluation_uses_the_tasks_own_adapter_and_the_base_for_unseen_tasks():
    plain, model, ctx, strategy = trained_adapters({})
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    outputs = []
    for task in range(4):
        strategy.before_eval(ctx, task)
        expected = merged_reference(plain, model, [f"task{task}"] if task < 3 else [])
        torch.testing.assert_close(logits(model), logits(expected), atol=1e-5, rtol=1e-5)
        outputs.append(logits(model))
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # switching never unfreezes


def test_merge_evaluates_every_adapter_at_once_whatever_the_task():
    plain, model, ctx, strategy = trained_adapters({"merge": True})
    expected = logits(merged_reference(plain, model, ["task0", "task1", "task2"]))
    for task in range(4):
        strategy.before_eval(ctx, task)
        torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)


def test_orthogonality_loss_is_the_l1_overlap_of_the_a_subspaces():
    eye = torch.eye(4)
    assert float(subspace_overlap([(eye[:2], eye[2:])])) == 0.0  # orthogonal row spaces
    assert float(subspace_overlap([(eye[:2], eye[1:3])])) == 1.0  # one shared direction
    model = tiny_model()
    ctx = tiny_context(model)
    strategy = Adapters(AdaptersConfig(orthogonal_lambda=0.5))
    train(ctx, strategy, 0)
    ctx.task_index, ctx.step = 1, 0
    strategy.before_task(ctx)
    penalised = strategy.loss(ctx, {}, None, torch.tensor(1.0))
    a = dict(lora_parameters(model))
    expected = sum(float((a[n].detach() @ a[n.replace("task0", "task1")].detach().T).abs().sum())
                   for n in a if "lora_A.task0" in n)
    assert float(penalised.detach()) == pytest.approx(1.0 + 0.5 * expected, rel=1e-5)
    assert ctx.extras["lora_overlap"] == pytest.approx(expected, rel=1e-5)
    penalised.backward()  # the gradient reaches the new adapter's A only
    assert all((p.grad is not None) == ("lora_A.task1" in n) for n, p in a.items())
    ctx.options = {"orthogonal_lambda": 2.0}  # this task's own weight (tasks.tasks.1.strategy_overrides), a value
    assert float(strategy.loss(ctx, {}, None, torch.tensor(1.0))) == pytest.approx(1.0 + 2.0 * expected, rel=1e-5)
    ctx.options = {"orthogonal_lambda": 0.0}
    assert float(strategy.loss(ctx, {}, None, torch.tensor(1.0))) == 1.0
    assert strategy.cfg.orthogonal_lambda == 0.5


def test_resume_recreates_the_adapters_so_the_checkpoint_weights_fit():
    model = tiny_model()
    ctx, strategy = tiny_context(model), Adapters(AdaptersConfig())
    for task in range(2):
        train(ctx, strategy, task)
    fresh = tiny_model(seed=1)
    ctx2, resumed = tiny_context(fresh), Adapters(AdaptersConfig())
    resumed.load_state_dict(strategy.state_dict())
    resumed.on_resume(ctx2)
    fresh.load_state_dict(model.state_dict())  # strict: same adapters, same names
    for task in range(2):
        strategy.before_eval(ctx, task)
        resumed.before_eval(ctx2, task)
        assert torch.equal(logits(model), logits(fresh))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, _ in lora_parameters(fresh, "task1")}


def test_shared_lora_trains_one_adapter_through_the_sequence():
    model = tiny_model()
    ctx, strategy = tiny_context(model), SharedLoRA(SharedLoRAConfig())
    train(ctx, strategy, 0)
    lora = {n for n, _ in model.named_parameters() if ".lora_" in n}  # "...c_attn.lora_A.<adapter>.weight"
    assert lora and {n.split(".lora_")[1].split(".")[1] for n in lora} == {"shared"}
    after_first = snapshot(model)
    ctx.task_index = 1
    strategy.before_task(ctx)  # the next task neither adds an adapter nor re-initialises the one there is
    assert {n for n, _ in model.named_parameters() if ".lora_" in n} == lora
    assert all(torch.equal(v, after_first[k]) for k, v in model.state_dict().items())
    train(ctx, strategy, 1)
    after_second = snapshot(model)
    moved = {k for k, v in after_second.items() if not torch.equal(v, after_first[k])}
    assert moved and moved <= lora  # that same adapter trains on task 1; the base stays frozen
    assert strategy.accounting()["extra_parameters"] == sum(p.numel() for n, p in model.named_parameters()
                                                            if n in lora)


@pytest.mark.slow
def test_adapters_end_to_end_never_forget_and_report_their_cost(tmp_path):
    result = run_quietly(make_config("strategy=adapters", "train.epochs=1"), tmp_path)
    rows = [[stage["scores"][n]["score"] for n in result["tasks"]] for stage in result["stages"]][1:]
    for i, row in enumerate(rows):  # with task identity, task j's score never moves after it is trained
        assert all(row[j] == rows[j][j] for j in range(i))
    cost = result["strategy_accounting"]
    assert cost["adapters"] == 3 and cost["extra_parameters"] == 3 * cost["trainable_parameters"] > 0
    assert cost["base_parameters_frozen"] == result["parameters"]["total"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy=adapters", "strategy.rank=0"], "strategy.rank: expected a positive"),
    (["strategy=shared_lora", "strategy.dropout=1"], r"strategy.dropout: expected a value in \[0, 1\)"),
    (["strategy=adapters", "strategy.target_modules=[]"], "strategy.target_modules: expected null or a non-empty"),
    (["strategy=adapters", "strategy.orthogonal_lambda=-1"], "strategy.orthogonal_lambda: expected a non-negative"),
])
def test_bad_options_fail_with_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(*overrides)


def test_target_modules_that_match_nothing_fail_with_the_key():
    with pytest.raises(ConfigError, match="strategy.target_modules: .*nope"):
        add_lora(tiny_model(), "task0", AdaptersConfig(target_modules=["nope"]), 0, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("options", [["strategy=adapters"], ["strategy=shared_lora"],
                                     ["strategy=adapters", "strategy.merge=true", "strategy.orthogonal_lambda=0.5"]])
def test_runs_on_cuda_in_bf16(tmp_path, options):
    result = run_quietly(make_config(*options, "device=cuda", "train.epochs=1"), tmp_path)
    assert result["status"] == "completed" and result["precision"] == "bf16"


def test_the_default_adapts_the_query_and_value_projections_as_each_model_names_them():
    """O-LoRA's [q, v]: T5's own q and v; Llama's q_proj and v_proj; GPT-2's fused q,k,v c_attn (k too)."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from cl_runner.strategies.lora import resolve_targets

    assert AdaptersConfig().target_modules == ["q", "v"] and SharedLoRAConfig().target_modules is None
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    gpt2 = tiny_model()
    assert resolve_targets(t5, ["q", "v"]) == ["q", "v"] and resolve_targets(llama, ["q", "v"]) == ["q_proj", "v_proj"]
    assert resolve_targets(gpt2, ["q", "v"]) == ["c_attn"] and resolve_targets(gpt2, None) is None
    add_lora(gpt2, "task0", AdaptersConfig(), 0, torch.device("cpu"))
    add_lora(gpt2, "task1", AdaptersConfig(), 0, torch.device("cpu"))  # c_attn is peft's wrapper by now
    adapted = {n.split(".lora_")[0] for n, _ in lora_parameters(gpt2)}
    assert adapted == {f"transformer.h.{i}.attn.c_attn" for i in (0, 1)}
    add_lora(llama, "task0", AdaptersConfig(), 0, torch.device("cpu"))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in lora_parameters(llama)} == {"q_proj", "v_proj"}
