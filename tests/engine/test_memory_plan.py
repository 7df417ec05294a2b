"""The memory plan (cl_runner/engine/memory_plan.py) against numbers computed by hand for model=tiny (GPT-2, 2
layers, 128 wide, MLP 512, 4 heads, vocabulary 1024, 256 positions, transformers' default dropouts of 0.1:
560,640 parameters), the activation formula against the bytes autograd really saves (GPT-2 and Llama), the
strategies' own state and trained parameters, the LoRA count against peft's, and ``cl-run --plan``'s refusal of
a run that cannot fit."""

from __future__ import annotations

import pytest
import torch
from helpers import main_exit, make_config
from tiny_lm import one_thread, tiny_context, tiny_model  # noqa: F401 - the fixture
from transformers import AutoConfig, AutoModelForCausalLM

from cl_runner.core.errors import ConfigError
from cl_runner.engine import memory_plan
from cl_runner.engine.activations import enable
from cl_runner.models.lm import causal_lm_loss
from cl_runner.strategies.base import ModelSize
from cl_runner.strategies.l2p import L2P, L2PConfig
from cl_runner.strategies.lora import add_lora, count, lora_parameters, lora_size
from cl_runner.strategies.progressive import Progressive, ProgressiveConfig

PARAMS = 1024 * 128 + 256 * 128 + 2 * (2 * 256 + (128 * 384 + 384) + (128 * 128 + 128) + (128 * 512 + 512)
                                       + (512 * 128 + 128)) + 256  # wte, wpe, 2 blocks (2 norms, 4 linears), ln_f
TOKENS = 8 * 256  # train.batch_size x train.max_length
# bytes per token, fp32 on CPU (the module docstring's terms; h 128, q = kv = 128, i 512, H 4, L 256, V 1024):
BLOCK = ((6 * 128 + 2 * 128 + 2 * 128 + (4 + 1) * 512 + 4 + 4) * 4  # gelu_new saves 4 elements per element
         + 2 * 128 * 4  # the residual dropouts' noise
         + 4 * 255 * 4 + 4 * 256 * 8)  # sdpa with attention dropout on CPU: probabilities, noise, their product
ONCE = (2 * 128 + 2) * 4 + 128 * 4 + 1024 * 4  # ln_f, the embedding dropout's noise, the fp32 log-softmax
LOGITS = 1024 * (4 + 8)  # the logits the loop holds, the log-softmax's and its input's fp32 gradients


def test_the_tiny_models_plan_is_the_hand_computed_one():
    plan = memory_plan.plan(make_config(), world_size=1)
    assert PARAMS == 560_640 and BLOCK == 28_688
    assert plan.rows == {"weights": PARAMS * 4, "gradients": PARAMS * 4, "optimizer": 2 * PARAMS * 4, "strategy": 0,
                         "activations": TOKENS * (2 * BLOCK + ONCE + LOGITS)}
    checkpointed = memory_plan.plan(make_config("train.activation_checkpointing=true"), world_size=1)
    # each block's input; then one block recomputed at a time, the log-softmax and its gradients gone by then
    assert checkpointed.rows["activations"] == TOKENS * (2 * 128 * 4 + ONCE + 1024 * 4 + BLOCK - 1024 * 4)


def _saved_bytes(model: torch.nn.Module, batch: int, length: int) -> int:
    """What autograd saves in one training forward and the loop's loss (each storage once, parameters not)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model(input_ids=ids).logits, ids)
    return sum(kept.values())


@pytest.mark.parametrize("arch", [
    {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256},  # model=tiny
    {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 352,
     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_the_activation_formula_matches_what_autograd_saves(arch, checkpointed):
    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=1024, **arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    if checkpointed:
        enable(model)
    shape = memory_plan.shape_of(model, model.config)
    for batch, length in ((2, 64), (1, 192)):
        planned = memory_plan.saved_bytes(shape, batch, length, 4, checkpointed=checkpointed)
        assert planned == pytest.approx(_saved_bytes(model, batch, length), rel=0.1)


def test_fsdp_divides_weights_gradients_optimizer_and_parameter_copies_among_the_ranks():
    plan = memory_plan.plan(make_config("strategy=ewc", "train.grad_accum=2"), world_size=2)
    block = 2 * 256 + (128 * 384 + 384) + (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128)
    assert plan.rows["strategy"] == 2 * PARAMS * 4  # EWC: anchor and Fisher, fp32, replicated without fsdp
    cfg = make_config("strategy=ewc", "train.grad_accum=2")
    cfg.distributed.kind = "fsdp"  # set after validation: fsdp outside torchrun is refused there
    sharded = memory_plan.plan(cfg, world_size=2)
    assert sharded.sharded and sharded.rows["weights"] == PARAMS * 4 // 2 + 2 * block * 4  # + two gathered blocks
    assert sharded.rows["gradients"] == PARAMS * 4 // 2 and sharded.rows["optimizer"] == PARAMS * 4
    assert sharded.rows["strategy"] == PARAMS * 4
    micro_tokens = 2 * 256  # 8 examples over 2 ranks, 2 micro-batches each
    assert sharded.rows["activations"] == micro_tokens * (2 * BLOCK + ONCE + LOGITS)


def test_each_strategy_adds_its_own_state():
    def rows(*overrides):
        return memory_plan.plan(make_config(*overrides), world_size=1).rows

    assert rows("strategy=lwf")["strategy"] == PARAMS * 4  # the teacher
    assert rows("strategy=l2")["strategy"] == PARAMS * 4  # the anchor
    assert rows("strategy=replay", "strategy.buffer_size=10")["strategy"] == 10 * 256 * 16
    der = rows("strategy=der", "strategy.buffer_size=10", "strategy.logit_dtype=float16")
    assert der["strategy"] == 10 * 256 * 16 + 10 * 255 * 1024 * 2  # logits at up to 255 target positions
    # EWC's Fisher: 16 examples' gradients at once (training's gone) and 1.25x their eval activations, unfused
    vmapped = 16 * 256 * (2 * ((6 * 128 + 2 * 128 + 2 * 128 + 5 * 512 + 8) * 4 + 4 * 255 * 4)
                          + (2 * 128 + 2) * 4 + 1024 * 4 + LOGITS)
    assert rows("strategy=ewc")["activations"] == int(1.25 * vmapped) + 16 * PARAMS * 4 - PARAMS * 4
    adapters = rows("strategy=adapters", "strategy.rank=4", "strategy.target_modules=null")
    lora = 4 * 2 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))  # every linear but the head
    assert rows("strategy=adapters", "strategy.rank=4")["gradients"] == 4 * 2 * (128 + 384) * 4  # q,v: GPT-2's c_attn
    assert adapters["gradients"] == lora * 4 and adapters["optimizer"] == 2 * lora * 4
    assert adapters["strategy"] == 3 * lora * 4  # an adapter per task of the default sequence


def test_lora_size_counts_what_peft_adds():
    model = tiny_model()
    cfg = make_config("strategy=adapters", "strategy.rank=4").strategy
    predicted = lora_size(model, cfg)
    add_lora(model, "t0", cfg, seed=0, device=torch.device("cpu"))
    assert predicted == count(lora_parameters(model, "t0")) > 0


@pytest.mark.parametrize("strategy", [Progressive(ProgressiveConfig(rank=2)), L2P(L2PConfig(pool_size=4, length=3))])
def test_frozen_backbone_strategies_plan_what_really_trains(strategy):
    """Progressive's newest column (with its lateral gates) and L2P's pool are what the optimizer updates."""
    model = tiny_model()
    ctx = tiny_context(model, tasks=3)
    size = ModelSize(model, sum(p.numel() for p in model.parameters()), 4, 3, 64, 48)
    needs = strategy.memory_needs(size)
    for task in range(3):
        ctx.task_index = task
        strategy.before_task(ctx)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert needs.trainable == trained < size.parameters
    assert needs.sharded_bytes + needs.local_bytes == 4 * (sum(p.numel() for p in model.parameters())
                                                           - size.parameters)  # everything it added


def test_a_run_that_cannot_fit_is_refused_in_one_line_naming_the_levers(monkeypatch, capsys):
    monkeypatch.setattr(memory_plan, "host_available", lambda: 10 * 2**20)  # 10 MiB of RAM
    with pytest.raises(ConfigError, match="activation_checkpointing=true.*grad_accum=2.*strategy=adapters"):
        memory_plan.check(make_config(), torch.device("cpu"), "fp32")
    code, err = main_exit(["--plan", "device=cpu"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("cl-run: error: memory plan: the run needs about")
    monkeypatch.setattr(memory_plan, "host_available", lambda: 2**40)
    code, err = main_exit(["--plan", "device=cpu"], capsys)
    assert code == 0 and err == []
