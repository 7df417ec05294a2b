"""The memory plan (cl_runner/engine/memory_plan.py) against numbers computed by hand for model=tiny (GPT-2, 2
layers, 128 wide, vocabulary 1024, 256 positions: 560,640 parameters), the strategies' own state, the LoRA count
against peft's, and ``cl-run --plan``'s refusal of a run that cannot fit."""

from __future__ import annotations

import pytest
import torch
from helpers import main_exit, make_config
from tiny_lm import one_thread, tiny_model  # noqa: F401 - the fixture

from cl_runner.core.errors import ConfigError
from cl_runner.engine import memory_plan
from cl_runner.strategies.lora import add_lora, count, lora_parameters, lora_size

PARAMS = 1024 * 128 + 256 * 128 + 2 * (2 * 256 + (128 * 384 + 384) + (128 * 128 + 128) + (128 * 512 + 512)
                                       + (512 * 128 + 128)) + 256  # wte, wpe, 2 blocks (2 norms, 4 linears), ln_f
TOKENS = 8 * 256  # train.batch_size x train.max_length
PER_LAYER = 9 * 128 + 2 * 512  # elements kept per token and block (hidden 128, MLP 512)
LOGITS = TOKENS * 1024 * 4 * 3  # fp32 logits, log-softmax, their gradient


def test_the_tiny_models_plan_is_the_hand_computed_one():
    plan = memory_plan.plan(make_config(), world_size=1)
    assert PARAMS == 560_640
    assert plan.rows == {"weights": PARAMS * 4, "gradients": PARAMS * 4, "optimizer": 2 * PARAMS * 4, "strategy": 0,
                         "activations": TOKENS * (2 * PER_LAYER + 2 * 128) * 4 + LOGITS}
    checkpointed = memory_plan.plan(make_config("train.activation_checkpointing=true"), world_size=1)
    assert checkpointed.rows["activations"] == TOKENS * (2 * 128 + PER_LAYER + 2 * 128) * 4 + LOGITS


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
    assert sharded.rows["activations"] == micro_tokens * (2 * PER_LAYER + 2 * 128) * 4 + micro_tokens * 1024 * 12


def test_each_strategy_adds_its_own_state():
    def rows(*overrides):
        return memory_plan.plan(make_config(*overrides), world_size=1).rows

    assert rows("strategy=lwf")["strategy"] == PARAMS * 4  # the teacher
    assert rows("strategy=l2")["strategy"] == PARAMS * 4  # the anchor
    assert rows("strategy=replay", "strategy.buffer_size=10")["strategy"] == 10 * 256 * 16
    der = rows("strategy=der", "strategy.buffer_size=10", "strategy.logit_dtype=float16")
    assert der["strategy"] == 10 * 256 * 16 + 10 * 256 * 1024 * 2
    adapters = rows("strategy=adapters", "strategy.rank=4")
    lora = 4 * 2 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))  # every linear but the head
    assert adapters["gradients"] == lora * 4 and adapters["optimizer"] == 2 * lora * 4
    assert adapters["strategy"] == 3 * lora * 4  # an adapter per task of the default sequence


def test_lora_size_counts_what_peft_adds():
    model = tiny_model()
    cfg = make_config("strategy=adapters", "strategy.rank=4").strategy
    predicted = lora_size(model, cfg)
    add_lora(model, "t0", cfg, seed=0, device=torch.device("cpu"))
    assert predicted == count(lora_parameters(model, "t0")) > 0


def test_a_run_that_cannot_fit_is_refused_in_one_line_naming_the_levers(monkeypatch, capsys):
    monkeypatch.setattr(memory_plan, "host_available", lambda: 10 * 2**20)  # 10 MiB of RAM
    with pytest.raises(ConfigError, match="activation_checkpointing=true.*grad_accum=2.*strategy=adapters"):
        memory_plan.check(make_config(), torch.device("cpu"), "fp32")
    code, err = main_exit(["--plan", "device=cpu"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("cl-run: error: memory plan: the run needs about")
    monkeypatch.setattr(memory_plan, "host_available", lambda: 2**40)
    code, err = main_exit(["--plan", "device=cpu"], capsys)
    assert code == 0 and err == []
