"""prompt_tuning / progressive_prompts: the soft prompt is prepended as a manual forward over concatenated
embeddings would, in the order [P_t; ...; P_1]; only the newest prompt trains (the LM and earlier prompts stay
bit-identical); label scores and greedy generation through the KV cache equal a brute-force forward; evaluation
with and without task identity; resume re-creates the prompts; bad options, packing and an encoder-decoder refused;
a short run learns."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config, run_quietly
from tiny_lm import CUE, EOS, one_thread, tiny_context, tiny_model, train  # noqa: F401 (autouse fixture)
from tiny_t5 import t5_context, tiny_t5

from cl_runner.config.schema import EvalConfig
from cl_runner.core.errors import ConfigError
from cl_runner.scoring.evaluate import Scorer, greedy_generate, label_logprobs
from cl_runner.strategies.prompts import (
    ATTRIBUTE,
    ProgressivePrompts,
    ProgressivePromptsConfig,
    PromptTuning,
    PromptTuningConfig,
)

LENGTH = 3


def prompted(tasks: int = 2, trained: bool = True, **options):
    """A tiny GPT-2 with ``tasks`` progressive prompts (trained, or made and set to distinct random values)."""
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=3), ProgressivePrompts(ProgressivePromptsConfig(length=LENGTH, **options))
    for task in range(tasks):
        if trained:
            train(ctx, strategy, task, lr=0.1)
        else:
            ctx.task_index = task
            strategy.before_task(ctx)
            with torch.no_grad():
                prompt(model, task).normal_(generator=torch.Generator().manual_seed(task))
    return model, ctx, strategy


def prompt(model: torch.nn.Module, task: int) -> torch.nn.Parameter:
    return getattr(model, ATTRIBUTE)[str(task)].embedding.weight


def manual_logits(model: torch.nn.Module, tasks: list[int], ids: list[int]) -> torch.Tensor:
    """(len(ids), V): the logits of ``ids`` with the prompts of ``tasks`` (leftmost first) concatenated in front
    of its embeddings by hand, with the hooks switched off."""
    hooks = getattr(model, ATTRIBUTE).hooks
    active, hooks.active = hooks.active, []
    try:
        with torch.no_grad():
            embeds = torch.cat([*(prompt(model, t) for t in tasks), model.get_input_embeddings()(torch.tensor(ids))])
            return model(inputs_embeds=embeds[None]).logits[0, -len(ids) :]
    finally:
        hooks.active = active


def test_the_prompts_are_prepended_newest_first_as_concatenated_embeddings_would_be():
    model, ctx, strategy = prompted(tasks=3, trained=False)
    assert strategy.hooks.active == ["2", "1", "0"]
    short, long = [7, 10, *CUE], [8, 11, 12, 13, *CUE, 30]
    batch = ctx.collate([{"input_ids": ids, "labels": ids, "task_id": 0} for ids in (short, long)])  # right-padded
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.shape[:2] == batch["input_ids"].shape  # the prompt positions are cut from the logits
    for row, ids in enumerate((short, long)):
        torch.testing.assert_close(out[row, : len(ids)], manual_logits(model, [2, 1, 0], ids), atol=1e-6, rtol=1e-6)
    reversed_order = manual_logits(model, [0, 1, 2], long)  # a tiny random GPT-2: measured 2e-4 apart
    assert (out[1] - reversed_order).abs().max() > 1e-5  # the order matters, and ours is [P_3; P_2; P_1]


def test_only_the_newest_prompt_trains_and_the_lm_and_earlier_prompts_stay_bit_identical():
    model, ctx, strategy = prompted(tasks=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(ctx, strategy, 1, lr=0.1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the LM and P_1
    assert not torch.equal(prompt(model, 1), strategy_init(ctx, 1))  # P_2 learnt
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{ATTRIBUTE}.1.embedding.weight"]
    batch = ctx.collate(ctx.train_sets[1][:2])
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == [f"{ATTRIBUTE}.1.embedding.weight"]


def strategy_init(ctx, task: int) -> torch.Tensor:
    from cl_runner.strategies.prompts import new_prompt

    return new_prompt(ctx, task, LENGTH, "vocab").embedding.weight


def brute_force_logprob(model, tasks, prompt_ids, label):
    logp = torch.log_softmax(manual_logits(model, tasks, prompt_ids + label).float(), -1)
    return sum(float(logp[len(prompt_ids) - 1 + t, tok]) for t, tok in enumerate(label))


def brute_force_greedy(model, tasks, prompt_ids, steps):
    out = []
    for _ in range(steps):
        token = int(manual_logits(model, tasks, prompt_ids + out)[-1].argmax())
        if token == EOS:
            break
        out.append(token)
    return out


def test_label_scores_and_generation_through_the_cache_equal_a_brute_force_forward():
    model, ctx, strategy = prompted(tasks=2, trained=False)
    strategy.before_eval(ctx, 1)
    scorer = Scorer(model=model, pad_id=EOS, eos_id=EOS, device=torch.device("cpu"), autocast=torch.no_grad,
                    batch_size=8, cfg=EvalConfig(), decode=str)
    prompts, labels = [[7, 10, *CUE], [8, 12, 13, 14, 15, *CUE]], [[30], [31, 32, 33]]  # left-padded together
    scores = label_logprobs(scorer, prompts, labels)
    for b, p in enumerate(prompts):
        for k, label in enumerate(labels):
            assert float(scores[b, k]) == pytest.approx(brute_force_logprob(model, [1, 0], p, label), abs=1e-4)
    generated = greedy_generate(scorer, prompts, max_new_tokens=4)
    assert generated == [brute_force_greedy(model, [1, 0], p, 4) for p in prompts]


@pytest.mark.parametrize(("cls", "options", "expected"), [
    (PromptTuning, {"task_identity": True}, [["0"], ["1"], []]),
    (PromptTuning, {"task_identity": False}, [["1"], ["1"], ["1"]]),
    (PromptTuning, {"shared": True}, [["0"], ["0"], ["0"]]),
    (ProgressivePrompts, {"task_identity": False}, [["1", "0"], ["1", "0"], ["1", "0"]]),
    (ProgressivePrompts, {"task_identity": True}, [["0"], ["1", "0"], ["1", "0"]]),
])
def test_each_task_is_scored_with_the_prompts_its_evaluation_mode_names(cls, options, expected):
    model = tiny_model()
    ctx, strategy = tiny_context(model, tasks=3), cls(cls.Config(length=LENGTH, **options))
    for task in range(2):  # task 2 is not trained yet
        ctx.task_index = task
        strategy.before_task(ctx)
    seen = []
    for task in range(3):
        strategy.before_eval(ctx, task)
        seen.append(list(strategy.hooks.active))
    strategy.after_eval(ctx)
    assert seen == expected and strategy.hooks.active == strategy.training_prompts(1)


def test_resume_recreates_the_prompts_and_the_newest_trains():
    model, ctx, strategy = prompted(tasks=2)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[7, 10, *CUE]])).logits
    fresh = tiny_model(seed=1)
    ctx2, resumed = tiny_context(fresh, tasks=3), ProgressivePrompts(ProgressivePromptsConfig(length=LENGTH))
    resumed.load_state_dict(strategy.state_dict())
    resumed.on_resume(ctx2)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=torch.tensor([[7, 10, *CUE]])).logits, expected)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [f"{ATTRIBUTE}.1.embedding.weight"]


def test_accounting_counts_the_prompts():
    model, ctx, strategy = prompted(tasks=2)
    cost, dim = strategy.accounting(), model.config.n_embd
    assert cost["trainable_parameters"] == LENGTH * dim and cost["extra_parameters"] == 2 * LENGTH * dim
    assert cost["prompt_tokens_at_eval"] == 2 * LENGTH and cost["prompts"] == 2
    assert cost["trainable_parameters_per_task"] == {"t0": LENGTH * dim, "t1": LENGTH * dim}
    assert cost["base_parameters_frozen"] == sum(p.numel() for p in tiny_model().parameters())


def test_text_init_starts_from_the_task_instruction():
    model = tiny_model()
    ctx, strategy = tiny_context(model), PromptTuning(PromptTuningConfig(length=6, init="text"))
    strategy.before_task(ctx)
    instruction = ctx.train_sets[0][0]["input_ids"][:4]  # [relation, subject, *CUE]: repeated, then cut to 6
    assert torch.equal(prompt(model, 0), model.get_input_embeddings().weight[instruction + instruction[:2]])


@pytest.mark.parametrize("overrides", [["strategy.length=0"], ["strategy.init=words"], ["train.pack=true"]])
@pytest.mark.parametrize("name", ["prompt_tuning", "progressive_prompts"])
def test_bad_options_and_packing_are_refused_with_their_key(name, overrides):
    key = overrides[0].split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}: "):
        make_config(f"strategy={name}", *overrides)


def test_a_prompt_longer_than_the_context_allows_is_refused():
    model = tiny_model()
    with pytest.raises(ConfigError, match="strategy.length: 3 x 30 prompt tokens"):
        ProgressivePrompts(ProgressivePromptsConfig(length=30)).check(tiny_context(model))


@pytest.mark.parametrize("cls", [PromptTuning, ProgressivePrompts])
def test_an_encoder_decoder_is_refused_in_one_line_by_the_fact_its_class_declares(cls):
    model = tiny_t5()
    with pytest.raises(ConfigError) as err:
        cls(cls.Config()).check(t5_context(model))
    reason = cls.supports.encoder_decoder[0].reason  # the fact its class declares (strategies/support.py)
    assert str(err.value) == f"strategy.name: {cls.name} is not supported with an encoder-decoder model: {reason}"
    assert not hasattr(model, ATTRIBUTE)  # refused before any prompt is made


@pytest.mark.slow
def test_a_short_progressive_prompts_run_learns_and_keeps_each_task_with_its_own_prompts(tmp_path):
    tasks = [{"name": n, "source": "facts", "relation": n, "num_subjects": 12, "metric": "perplexity"}
             for n in ("color", "city")]
    cfg = make_config("strategy=progressive_prompts", "strategy.task_identity=true", "train.epochs=3",
                      "train.lr=0.1", "checkpoint.enabled=false", "train.keep_best=false", tasks=tasks)
    result = run_quietly(cfg, tmp_path)
    rows = [[stage["scores"][n]["score"] for n in result["tasks"]] for stage in result["stages"]]
    assert rows[1][0] < 0.9 * rows[0][0] and rows[2][1] < 0.9 * rows[1][1]  # each prompt learnt (perplexity)
    assert rows[2][0] == rows[1][0]  # with identity, task 1 is scored with [P_1] alone, never changed by task 2
    assert result["strategy_accounting"]["prompts"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["prompt_tuning", "progressive_prompts"])
def test_runs_on_cuda_in_bf16(tmp_path, name):
    result = run_quietly(make_config(f"strategy={name}", "device=cuda", "train.epochs=1"), tmp_path)
    assert result["status"] == "completed" and result["precision"] == "bf16"
